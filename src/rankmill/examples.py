"""Render a prompt template against example data, to see exactly what a model will be sent.

``rankmill prompt NAME --example [--run RUN]`` uses this: the variables a template needs
(found with Jinja2's own parser) are filled from a run's committed tables when a run
directory is given (the first query with a candidate pool, its documents), else from the
sample corpus in ``data/sample`` of a source checkout, else from a built-in pair. Queries and
documents are fenced exactly as the stages fence them::

    messages = example_messages("rank_window", run_dir="runs/quickstart")
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jinja2
from jinja2 import meta

from rankmill.prompting import fence, render_messages
from rankmill.stage import load_prompt

SAMPLE_DIR = Path(__file__).resolve().parents[2] / "data" / "sample"

_FALLBACK = (
    "how do vaccines train the immune system",
    [
        "Vaccines expose the immune system to a harmless antigen so that it learns to "
        "recognise the pathogen.",
        "Tides are caused by the gravitational pull of the moon and the sun on the oceans.",
        "Rinse the rice, add two cups of water per cup and simmer it covered.",
    ],
)


def template_variables(text: str) -> set[str]:
    """The names a template reads that it does not define itself."""
    env = jinja2.Environment()
    return set(meta.find_undeclared_variables(env.parse(text)))


def _from_run(run_dir: str, n_docs: int) -> tuple[str, list[str]] | None:
    from rankmill.manifest import RunDir

    rd = RunDir(run_dir)
    cfg = rd.read_pipeline() or {}
    stages = list((cfg.get("stages") or {}).keys())
    tables: dict[str, Any] = {}
    for stage in stages:  # later stages win: the latest corpus, queries and pools
        for name in ("corpus", "queries", "candidates"):
            try:
                tables[name] = rd.read_table(stage, name)
            except Exception:  # noqa: BLE001 - a stage without that table, or not run yet
                continue
    if "corpus" not in tables or "queries" not in tables:
        return None
    corpus = tables["corpus"]
    texts = dict(
        zip(corpus.column("doc_id").to_pylist(), corpus.column("text").to_pylist(), strict=True)
    )
    queries = dict(
        zip(
            tables["queries"].column("query_id").to_pylist(),
            tables["queries"].column("text").to_pylist(),
            strict=True,
        )
    )
    if "candidates" in tables and tables["candidates"].num_rows:
        pool = tables["candidates"].slice(0, 1).to_pylist()[0]
        docs = [texts[d] for d in pool["doc_ids"] if d in texts][:n_docs]
        if pool["query_id"] in queries and docs:
            return queries[pool["query_id"]], docs
    if not queries or not texts:
        return None
    return next(iter(queries.values())), list(texts.values())[:n_docs]


def _from_sample(n_docs: int) -> tuple[str, list[str]] | None:
    corpus, queries = SAMPLE_DIR / "corpus.jsonl", SAMPLE_DIR / "queries.jsonl"
    if not corpus.is_file() or not queries.is_file():
        return None
    docs = [json.loads(x)["text"] for x in corpus.read_text("utf-8").splitlines()[:n_docs] if x]
    query = json.loads(queries.read_text("utf-8").splitlines()[0])["text"]
    return query, docs


def example_messages(
    name: str, run_dir: str | None = None, n_docs: int = 3, doc_max_chars: int = 600
) -> list[dict[str, str]]:
    """Template ``name`` rendered with example data (see the module docstring)."""
    text = load_prompt(name)
    data = (_from_run(run_dir, n_docs) if run_dir else None) or _from_sample(n_docs) or _FALLBACK
    query, docs = data
    docs = [d[:doc_max_chars] for d in docs] or _FALLBACK[1]
    values: dict[str, Any] = {
        "query": fence(query, "QUERY"),
        "document": fence(docs[0], "DOCUMENT"),
        "passages": [fence(d, "DOCUMENT") for d in docs],
        "n": len(docs),
        "answer_format": "json",
        "kind": "verdict",
    }
    needed = template_variables(text)
    unknown = needed - set(values)
    if unknown:
        from rankmill.errors import ConfigError

        raise ConfigError(
            f"prompt {name!r} reads variables with no example value: {', '.join(sorted(unknown))}"
        )
    return render_messages(text, **{k: v for k, v in values.items() if k in needed})
