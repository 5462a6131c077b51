"""Benchmark: rankmill's miner vs sentence-transformers' ``mine_hard_negatives``.

    python benchmarks/mining.py                       # cranfield, cisi, med
    python benchmarks/mining.py --collections adi --num-negatives 3

Both miners get the same model (all-MiniLM-L6-v2), the same number of negatives, and the
same single positive per judged query (a seeded choice among the judged-relevant documents,
as a synthetic query knows only its source document); sentence-transformers keeps its other
defaults. Every judged-relevant document counts when scoring, so the false-negative rate is
the share of mined negatives that the judgments mark relevant (a lower bound: judgments are
incomplete). Each miner runs in a fresh subprocess, timed from "model loaded" to "negatives
out"; rankmill starts with an empty embedding cache (its warm-cache time is shown apart).
rankmill runs its in-process engine (:class:`rankmill.retrieval.miner.Miner`, what each
Ray actor of the ``mine`` stage runs), so Ray start-up is not in its time.

Prints a table per collection, a memory estimate for a 1M-passage corpus, and last:
``summary: time_ratio=… memory_ratio=… fn_rate=… fn_rate_st=… fn_ratio=… kept_ratio=…``
(rankmill / sentence-transformers, over all collections run; rates pool all negatives).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class PeakRSS:
    """Samples this process's resident memory every few milliseconds."""

    def __init__(self, every_s: float = 0.01):
        import psutil

        self.proc = psutil.Process()
        self.every_s = every_s
        self.peak = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(self.every_s)

    def __enter__(self) -> PeakRSS:
        self.base = self.proc.memory_info().rss
        self.peak = self.base
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


def score(coll, negatives: dict[str, list[str]]) -> dict[str, float]:
    n = sum(len(v) for v in negatives.values())
    fn = sum(1 for q, v in negatives.items() for d in v if d in coll.relevant.get(q, ()))
    ex = sum(1 for q, v in negatives.items() for d in v if d in coll.excluded.get(q, ()))
    return {"negatives": n, "false_negatives": fn, "excluded_used": ex}


# -- workers (each in its own process) ----------------------------------------------------------
def worker_st(args: argparse.Namespace) -> dict:
    from _judged import load, one_positive
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from rankmill.retrieval.dense import resolve_model
    from rankmill.retrieval.miner import doc_text

    coll = load(args.collection)
    pos = one_positive(coll, args.seed)
    texts = [doc_text(t, x) for t, x in zip(coll.titles, coll.texts, strict=True)]
    ids_of_text: dict[str, list[str]] = {}
    for d, t in zip(coll.doc_ids, texts, strict=True):
        ids_of_text.setdefault(t, []).append(d)
    text_of = dict(zip(coll.doc_ids, texts, strict=True))
    qids = sorted(pos)
    qids_of_text: dict[str, list[str]] = {}
    for q in qids:
        qids_of_text.setdefault(coll.queries[q], []).append(q)
    ds = Dataset.from_dict(
        {"query": [coll.queries[q] for q in qids], "positive": [text_of[pos[q]] for q in qids]}
    )
    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = mine_hard_negatives(
            ds,
            model,
            corpus=texts,
            num_negatives=args.num_negatives,
            output_scores=True,
            verbose=False,
        )
        seconds = time.perf_counter() - t0
    negatives: dict[str, list[str]] = {q: [] for q in qids}
    sims: list[float] = []
    for row in out:
        for q in qids_of_text[row["query"]]:
            # A duplicated text stands for all its ids; count it relevant if any of them is.
            ids = ids_of_text[row["negative"]]
            rel = [d for d in ids if d in coll.relevant.get(q, ())]
            negatives[q].append(rel[0] if rel else ids[0])
        sims.append(row["scores"][1])
    negatives = {q: v for q, v in negatives.items() if v}
    return {
        "seconds": seconds,
        "peak_mb": mem.peak / 2**20,
        "delta_mb": (mem.peak - mem.base) / 2**20,
        "queries": len(qids),
        "kept": len(negatives),
        "mean_sim": sum(sims) / max(1, len(sims)),
        **score(coll, negatives),
    }


def worker_rankmill(args: argparse.Namespace) -> dict:
    import numpy as np
    from _judged import load, one_positive

    from rankmill.retrieval.miner import MineQuery, Miner, MiningParams

    coll = load(args.collection)
    pos = one_positive(coll, args.seed)
    overrides = dict(kv.split("=", 1) for kv in args.set or [])
    params = MiningParams.model_validate(
        {"num_negatives": args.num_negatives, **{k: json.loads(v) for k, v in overrides.items()}}
    )
    qs = [
        MineQuery(q, coll.queries[q], [pos[q]], sorted(coll.excluded.get(q, ())))
        for q in sorted(pos)
    ]
    import bm25s  # noqa: F401  (libraries load before timing, as datasets does for st)
    import faiss  # noqa: F401
    import rapidfuzz.process  # noqa: F401

    with tempfile.TemporaryDirectory() as cache:
        miner = Miner(params, cache_dir=cache, seed=args.seed)
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            miner.index_corpus(coll.doc_ids, coll.titles, coll.texts)
            res = miner.mine(qs)
            seconds = time.perf_counter() - t0
        # Second run over the same corpus: embeddings come from the cache.
        warm = Miner(params, cache_dir=cache, seed=args.seed)
        t0 = time.perf_counter()
        warm.index_corpus(coll.doc_ids, coll.titles, coll.texts)
        warm.mine(qs)
        warm_seconds = time.perf_counter() - t0
        emb_bytes = int(np.asarray(miner.emb).nbytes)
    negatives = {m.query_id: m.negative_ids for m in res if m.negative_ids}
    sims = [s for m in res for s in m.negative_scores]
    skipped: dict[str, int] = {}
    for m in res:
        for k, v in m.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    bm25_bytes = 0
    if miner.bm25 is not None and miner.bm25._retriever is not None:
        sc = miner.bm25._retriever.scores
        bm25_bytes = sum(v.nbytes for v in sc.values() if hasattr(v, "nbytes"))
    return {
        "seconds": seconds,
        "warm_seconds": warm_seconds,
        "peak_mb": mem.peak / 2**20,
        "delta_mb": (mem.peak - mem.base) / 2**20,
        "queries": len(qs),
        "kept": len(negatives),
        "mean_sim": float(np.mean(sims)) if sims else float("nan"),
        "skipped": skipped,
        "considered": sum(m.considered for m in res),
        "full_ranking": sum(m.full_ranking for m in res),
        "short": sum(0 < len(m.negative_ids) < args.num_negatives for m in res),
        "docs": len(coll.doc_ids),
        "dim": miner.encoder.dim,
        "emb_bytes": emb_bytes,
        "bm25_bytes": bm25_bytes,
        "text_bytes": int(miner.texts.nbytes) if miner.texts is not None else 0,
        "timings": miner.timings,
        **score(coll, negatives),
    }


# -- driver -----------------------------------------------------------------------------------
def run_worker(kind: str, collection: str, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        kind,
        "--collection",
        collection,
        "--num-negatives",
        str(args.num_negatives),
        "--seed",
        str(args.seed),
    ]
    for kv in args.set or []:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} on {collection} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--collections", nargs="+", default=["cranfield", "cisi", "med"])
    ap.add_argument("--num-negatives", type=int, default=3, help="sentence-transformers' default")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--set", action="append", help="rankmill MiningParams override key=json")
    ap.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="run each miner this many times (interleaved); "
        "the fastest run counts, to damp noise from other load on the machine",
    )
    ap.add_argument("--worker", choices=["st", "rankmill"], help=argparse.SUPPRESS)
    ap.add_argument("--collection", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        fn = worker_st if args.worker == "st" else worker_rankmill
        print(json.dumps(fn(args)))
        return

    from _judged import DATA

    if not DATA.is_dir():
        sys.exit(f"{DATA} is not there: this benchmark needs ../shared/data (see its README)")
    print(
        f"mining benchmark: all-MiniLM-L6-v2 on CPU, {args.num_negatives} negatives, one "
        f"seeded positive per judged query (seed {args.seed}); "
        f"rankmill overrides: {args.set or 'none'}"
    )
    rows = []
    for name in args.collections:
        st = rm = None
        for _ in range(args.repeats):
            s, r = run_worker("st", name, args), run_worker("rankmill", name, args)
            st = s if st is None or s["seconds"] < st["seconds"] else st
            rm = r if rm is None or r["seconds"] < rm["seconds"] else rm
        assert st is not None and rm is not None
        rows.append((name, st, rm))
        print(f"\n{name}: {rm['docs']} docs, {rm['queries']} judged queries")
        cols = [("time s", 8), ("peak MB", 9), ("+MB", 7), ("kept", 6), ("negs", 6), ("FN", 5)]
        cols += [("FN rate", 9), ("excl used", 10), ("mean sim", 10)]
        hdr = f"  {'miner':<22}" + "".join(f"{c:>{w}}" for c, w in cols)
        print(hdr)
        for label, r in (("sentence-transformers", st), ("rankmill", rm)):
            rate = r["false_negatives"] / max(1, r["negatives"])
            vals = [f"{r['seconds']:.1f}", f"{r['peak_mb']:.0f}", f"{r['delta_mb']:.0f}"]
            vals += [str(r[k]) for k in ("kept", "negatives", "false_negatives")]
            vals += [f"{rate:.3f}", str(r["excluded_used"]), f"{r['mean_sim']:.3f}"]
            print(
                f"  {label:<22}"
                + "".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols, strict=True))
            )
        print(
            f"  rankmill warm cache: {rm['warm_seconds']:.1f}s; stages: "
            + ", ".join(f"{k} {v:.1f}s" for k, v in rm["timings"].items())
        )
        print(
            f"  rankmill: {rm['full_ranking']} queries ranked the whole corpus (nothing survived "
            f"the mining depth); {rm['short']} kept fewer than {args.num_negatives} negatives"
        )
        total = rm["considered"]
        from rankmill.retrieval.filters import describe_skips

        for line in describe_skips(rm["skipped"], total):
            print(f"  rankmill {line}")

    # Memory for a 1M-passage corpus, from what one actor holds per document here.
    docs = sum(r["docs"] for _, _, r in rows)
    per_doc_bm25 = sum(r["bm25_bytes"] for _, _, r in rows) / docs
    per_doc_text = sum(r["text_bytes"] for _, _, r in rows) / docs
    dim = rows[0][2]["dim"]
    n = 1_000_000
    emb = n * dim * 4
    est = {
        "embeddings (mmap, page cache shared by actors)": emb,
        "faiss flat index copy": emb,
        "bm25 sparse index": per_doc_bm25 * n,
        "texts (Arrow)": per_doc_text * n,
        "transient: corpus as Python strings while indexing": per_doc_text * n * 2,
    }
    print(f"\nmemory estimate for 1M passages (dim {dim}, texts like these collections'):")
    for k, v in est.items():
        print(f"  {k:<52}{v / 2**30:>7.2f} GiB")
    print(
        f"  {'per actor, resident (excluding mmap, transient)':<52}"
        f"{(emb + per_doc_bm25 * n + per_doc_text * n) / 2**30:>7.2f} GiB  (+ model, ~0.5 GiB;"
        " ivf/hnsw by config; per unit only queries_per_unit x mining_depth ids)"
    )

    def tot(which: int, key: str) -> float:
        return sum(r[which][key] for r in rows)

    fn_rate = tot(2, "false_negatives") / max(1, tot(2, "negatives"))
    fn_rate_st = tot(1, "false_negatives") / max(1, tot(1, "negatives"))
    macro = [r[2]["false_negatives"] / max(1, r[2]["negatives"]) for r in rows]
    macro_st = [r[1]["false_negatives"] / max(1, r[1]["negatives"]) for r in rows]
    print(
        f"\nmacro FN rate (mean over collections): rankmill {sum(macro) / len(macro):.3f}, "
        f"sentence-transformers {sum(macro_st) / len(macro_st):.3f}"
    )
    summary = {
        "time_ratio": tot(2, "seconds") / tot(1, "seconds"),
        "memory_ratio": max(r[2]["peak_mb"] for r in rows) / max(r[1]["peak_mb"] for r in rows),
        "fn_rate": fn_rate,
        "fn_rate_st": fn_rate_st,
        "fn_ratio": fn_rate / fn_rate_st if fn_rate_st else float("nan"),
        "kept_ratio": tot(2, "kept") / max(1, tot(1, "kept")),
        "sim": sum(r[2]["mean_sim"] * r[2]["negatives"] for r in rows)
        / max(1, tot(2, "negatives")),
        "sim_st": sum(r[1]["mean_sim"] * r[1]["negatives"] for r in rows)
        / max(1, tot(1, "negatives")),
    }
    print("summary: " + " ".join(f"{k}={v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
