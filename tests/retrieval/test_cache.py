"""Embedding cache: computes once, keys on model and text, shares chunks across processes."""

from __future__ import annotations

import multiprocessing as mp
import os

import numpy as np

from rankmill.retrieval.cache import EmbeddingCache, cache_key

KEY = {"model": "fake", "prompt": None}


class FakeEncoder:
    """Deterministic 'embeddings' from text lengths; counts what it embeds."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        return np.array([[len(t), t.count("a"), 1.0] for t in texts], dtype=np.float32)


def test_second_call_is_a_hit_with_the_same_values(tmp_path):
    texts = ["a", "bb", "ccc aa"]
    enc = FakeEncoder()
    first, hit1 = EmbeddingCache(str(tmp_path)).get_or_compute(texts, KEY, enc)
    second, hit2 = EmbeddingCache(str(tmp_path)).get_or_compute(texts, KEY, enc)
    assert (hit1, hit2) == (False, True)
    assert enc.calls == [3]
    np.testing.assert_array_equal(first, second)
    assert isinstance(second, np.memmap)  # read back memory-mapped, not loaded whole


def test_key_depends_on_model_prompt_and_every_text():
    base = cache_key(KEY, ["x", "y"])
    assert base != cache_key({**KEY, "prompt": "query: "}, ["x", "y"])
    assert base != cache_key(KEY, ["x", "y "])
    assert base != cache_key(KEY, ["y", "x"])
    assert base == cache_key(dict(reversed(list(KEY.items()))), ["x", "y"])


def test_chunks_assemble_in_order_and_are_cleaned_up(tmp_path):
    texts = [f"t{'a' * i}" for i in range(10)]
    enc = FakeEncoder()
    cache = EmbeddingCache(str(tmp_path), chunk_size=3)
    emb, hit = cache.get_or_compute(texts, KEY, enc)
    assert not hit and enc.calls == [3, 3, 3, 1] and cache.computed_rows == 10
    np.testing.assert_array_equal(emb[:, 1], np.arange(10))
    assert [f for f in os.listdir(tmp_path) if f.endswith(".npy")] == [
        f"{cache_key(KEY, texts)}.npy"
    ]


def test_disabled_cache_always_computes(tmp_path):
    enc = FakeEncoder()
    cache = EmbeddingCache(None)
    cache.get_or_compute(["a"], KEY, enc)
    cache.get_or_compute(["a"], KEY, enc)
    assert enc.calls == [1, 1]


def _worker(root: str, texts: list[str], out: mp.Queue) -> None:
    enc = FakeEncoder()
    cache = EmbeddingCache(root, chunk_size=2)
    emb, _ = cache.get_or_compute(texts, KEY, enc)
    out.put((cache.computed_rows, np.asarray(emb).tolist()))


def test_concurrent_processes_split_the_chunks(tmp_path):
    texts = [f"doc {'a' * i}" for i in range(12)]
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(str(tmp_path), texts, q)) for _ in range(3)]
    for p in procs:
        p.start()
    results = [q.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    rows = [r for r, _ in results]
    assert sum(rows) == len(texts)  # every chunk embedded exactly once, by someone
    assert all(r[1] == results[0][1] for r in results)


def test_chunks_hold_texts_of_similar_length_and_assemble_in_corpus_order(tmp_path):
    texts = [f"t{'a' * (9 - i)}" for i in range(10)]  # longest first
    enc = FakeEncoder()
    cache = EmbeddingCache(str(tmp_path), chunk_size=4)
    emb, _ = cache.get_or_compute(texts, KEY, enc)
    assert enc.calls == [4, 4, 2]
    np.testing.assert_array_equal(emb[:, 1], [9 - i for i in range(10)])


def test_a_killed_build_keeps_its_finished_chunks(tmp_path):
    texts = [f"doc {'a' * i}" for i in range(10)]

    class Dies(FakeEncoder):
        def __call__(self, texts: list[str]) -> np.ndarray:
            if len(self.calls) == 2:
                raise KeyboardInterrupt  # the process dies while embedding its third chunk
            return super().__call__(texts)

    try:
        EmbeddingCache(str(tmp_path), chunk_size=3).get_or_compute(texts, KEY, Dies())
    except KeyboardInterrupt:
        pass
    enc = FakeEncoder()
    cache = EmbeddingCache(str(tmp_path), chunk_size=3)
    emb, hit = cache.get_or_compute(texts, KEY, enc)
    assert not hit and cache.computed_rows == 4  # only the chunks that were not finished
    np.testing.assert_array_equal(emb[:, 1], np.arange(10))
