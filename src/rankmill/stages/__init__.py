"""Stage registry: pipeline names of the built-in stages, and ``module:Class`` plug-ins.

A pipeline's stage type is a built-in name (``ingest``, ``mine``, ``label``, ...) or the
import path of a :class:`rankmill.stage.Stage` subclass, ``package.module:ClassName``.
"""

from __future__ import annotations

import importlib

BUILTIN: dict[str, str] = {
    "ingest": "rankmill.stages.ingest:IngestStage",
    "mine": "rankmill.stages.mine:MineStage",
    "label": "rankmill.stages.label:LabelStage",
    "export": "rankmill.stages.export:ExportStage",
    "queries": "rankmill.stages.queries:QueriesStage",
    "rank": "rankmill.stages.rank:RankStage",
    "report": "rankmill.stages.report:ReportStage",
    "judge": "rankmill.stages.judge:JudgeStage",
}


def stage_class(kind: str) -> type:
    """The Stage class for a pipeline stage type; KeyError with a readable message if none."""
    from rankmill.stage import Stage

    target = BUILTIN.get(kind)
    if target is None and ":" in kind:
        target = kind
    if target is None:
        raise KeyError(
            f"unknown stage type {kind!r} (built-in: {', '.join(sorted(BUILTIN))}; or give "
            "'uses: package.module:ClassName')"
        )
    module_name, _, cls_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise KeyError(f"stage type {kind!r}: cannot import {module_name}: {exc}") from exc
    cls = getattr(module, cls_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Stage)):
        raise KeyError(f"stage type {kind!r}: {target} is not a rankmill Stage subclass")
    return cls
