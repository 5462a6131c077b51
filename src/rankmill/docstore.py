"""Documents by reference: a stage's ``prepare`` step writes the documents its work names
once, as an uncompressed Arrow file, and every actor memory-maps it and looks them up by id.

Stages whose work units would otherwise carry document texts (``label``, ``judge``, ``rank``,
``queries``) plan without them: the driver never holds the texts, and units stay a few ids
long. A change of a text still re-runs such a stage, whose fingerprint holds the corpus's
committed content.

    # prepare (on a worker): the documents the pairs name, found from the plan's inputs
    return prepare_docs(step, self.plan_inputs(), lambda inputs: ids_of(self._pairs(inputs)))
    # setup and process (on each actor; opened on first use, shared by the actor's threads)
    self._docs = DocStore(lambda: self.step_file("prepare", DOCS_FILE))
    self._docs.fill(rows)  # doc_title/doc_text of each row without a text
    self._docs.lookup(doc_ids)  # (title, text) per id, None for an id the file lacks

A stage whose choice of documents needs their texts (``queries`` samples only documents with
text) makes that choice in its ``prepare`` step, from the corpus columns it names to
:func:`prepare_docs`; its units then name positions in the file (:meth:`DocStore.rows`).
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import pyarrow as pa

from rankmill.manifest import Counters
from rankmill.stage import StepContext, StepOutput

DOCS_FILE = "docs.arrow"  # the prepare step's file: doc_id, title, text
DOC_COLUMNS = ["doc_id", "title", "text"]


def write_docs(corpus: pa.Table, path: str, only: Iterable[str] | None = None) -> int:
    """Write the first row of each doc_id of ``corpus`` (doc_id, title, text) to ``path`` as
    one uncompressed Arrow record batch, only the ids in ``only`` when given (the documents a
    stage's work names); returns the number of documents written."""
    import pyarrow.compute as pc
    import pyarrow.ipc as ipc

    if only is not None:
        keep = pa.array(sorted(set(only)), pa.string())
        corpus = corpus.filter(pc.is_in(corpus.column("doc_id"), value_set=keep))
    if pc.count_distinct(corpus.column("doc_id")).as_py() < corpus.num_rows:
        first: dict[str, int] = {}
        for i, d in enumerate(corpus.column("doc_id").to_pylist()):
            first.setdefault(d, i)
        corpus = corpus.take(pa.array(sorted(first.values()), pa.int64()))
    titles = (
        corpus.column("title")
        if "title" in corpus.column_names
        else pa.nulls(corpus.num_rows, pa.string())
    )
    docs = pa.table(
        {
            "doc_id": corpus.column("doc_id").cast(pa.string()),
            "title": titles.cast(pa.large_string()),
            "text": corpus.column("text").cast(pa.large_string()),
        }
    )
    with ipc.new_file(path, docs.schema) as w:
        w.write_table(docs, max_chunksize=max(1, docs.num_rows))
    return docs.num_rows


def prepare_docs(
    step: StepContext,
    wanted: dict[str, list[str] | None],
    doc_ids: Callable[[dict[str, pa.Table]], Iterable[str]],
) -> StepOutput:
    """The prepare step of a stage whose units name documents: read the inputs ``wanted``
    names (the stage's ``plan_inputs``: the corpus as ids, or the corpus columns ``doc_ids``
    needs), ask ``doc_ids`` which documents its work names, and write those
    (:func:`write_docs`, in corpus order) for the actors to map."""
    import pyarrow.compute as pc

    chooses_by = wanted.get("corpus") or ["doc_id"]
    inputs = {
        name: step.read_input(name, columns)
        for name, columns in wanted.items()
        if name != "corpus" and step.has_input(name)
    }
    inputs["corpus"] = step.read_input("corpus", columns=chooses_by)
    keep = pa.array(sorted(set(doc_ids(inputs))), pa.string())
    # The texts, one upstream unit at a time: only the named documents are ever held.
    pieces = [
        t.filter(pc.is_in(t.column("doc_id"), value_set=keep))
        for t in step.iter_input("corpus", columns=DOC_COLUMNS)
    ]
    corpus = (
        pa.concat_tables(pieces, promote_options="default")
        if pieces
        else pa.table({c: pa.array([], pa.string()) for c in DOC_COLUMNS})
    )
    path = os.path.join(step.work_dir, DOCS_FILE)
    counters = Counters()
    counters.extra["documents"] = float(write_docs(corpus, path))
    return StepOutput(files={DOCS_FILE: path}, counters=counters)


class DocStore:
    """The documents of a file :func:`write_docs` wrote, memory-mapped on first use (``path``
    is called then, so a stage that never needs a text never opens it)."""

    def __init__(self, path: Callable[[], str]):
        self._path = path
        self._lock = threading.Lock()
        self._docs: pa.Table | None = None
        self._row: dict[str, int] = {}

    def _open(self) -> pa.Table:
        with self._lock:
            if self._docs is None:
                import pyarrow.ipc as ipc

                docs = ipc.open_file(pa.memory_map(self._path())).read_all()
                self._row = {d: i for i, d in enumerate(docs.column("doc_id").to_pylist())}
                self._docs = docs
            return self._docs

    def lookup(self, doc_ids: Sequence[str]) -> list[tuple[str | None, str] | None]:
        """(title, text) of each document, in order; None for an id the corpus lacks."""
        docs = self._open()
        rows = [self._row.get(d) for d in doc_ids]
        found = [i for i in rows if i is not None]
        if not found:
            return [None] * len(rows)
        picked = docs.take(pa.array(found, pa.int64()))
        hits = iter(
            zip(picked.column("title").to_pylist(), picked.column("text").to_pylist(), strict=True)
        )
        return [None if i is None else next(hits) for i in rows]

    def rows(self, start: int, stop: int) -> list[dict[str, Any]]:
        """The documents at positions ``start`` to ``stop`` (excluded) of the file, in its
        order, as ``{doc_id, title, text}``; fewer, or none, past its end."""
        return self._open().slice(start, max(0, stop - start)).to_pylist()

    def fill(self, rows: Sequence[dict[str, Any]]) -> None:
        """Set ``doc_title`` and ``doc_text`` of each row that has no ``doc_text`` from its
        ``doc_id`` (left None for an id the corpus lacks)."""
        need = [r for r in rows if r["doc_text"] is None]
        if need:
            for r, doc in zip(need, self.lookup([r["doc_id"] for r in need]), strict=True):
                if doc is not None:
                    r["doc_title"], r["doc_text"] = doc
