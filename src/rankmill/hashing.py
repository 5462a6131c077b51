"""Every canonical hash rankmill computes, in one place.

- :func:`stable_hash`: sha256 of the canonical JSON of plain data (sorted keys, no
  whitespace); fingerprints, unit keys and config identities are built with it.
- :func:`content_key`: :func:`stable_hash` of several plain values (lists of ids, dicts).
- :func:`table_key`: a hash of an Arrow table's schema and values, independent of how the
  table is chunked in memory.
- :func:`bytes_sha256` / :func:`file_sha256`: sha256 of bytes or of a local file.

Pure (hashlib, json, pyarrow): no I/O beyond :func:`file_sha256`.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pyarrow as pa

try:
    import orjson

    def _column_bytes(values: list[Any]) -> bytes:
        return orjson.dumps(values, default=str)

except ImportError:  # pragma: no cover

    def _column_bytes(values: list[Any]) -> bytes:
        return json.dumps(values, default=str, ensure_ascii=False).encode()


def canonical_json(obj: Any) -> bytes:
    """The canonical JSON encoding hashed by :func:`stable_hash`."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str
    ).encode("utf-8")


def stable_hash(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj``."""
    return hashlib.sha256(canonical_json(obj)).hexdigest()


def content_key(*parts: Any) -> str:
    """A stable hash of plain values (lists of ids, dicts)."""
    return stable_hash(list(parts))


def table_key(table: pa.Table) -> str:
    """A stable hash of a table's content (schema and values, not its memory layout)."""
    h = hashlib.sha256()
    h.update(str(table.schema).encode())
    for name in table.column_names:
        h.update(name.encode())
        col = table.column(name)
        for chunk_start in range(0, max(table.num_rows, 1), 65536):
            part = col.slice(chunk_start, 65536).to_pylist()
            h.update(_column_bytes(part))
    return h.hexdigest()


def bytes_sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: str, chunk: int = 1 << 20) -> str:
    """sha256 of a local file, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
