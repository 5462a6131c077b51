"""rankmill: training-data synthesis for retrievers and rerankers, as resumable Ray stages.

Run a pipeline with ``rankmill run pipelines/quickstart.yaml --run-dir runs/quickstart``;
see ``rankmill --help`` and the README.
"""

from __future__ import annotations

__version__ = "0.1.0"
