"""Benchmark: rankmill's miner vs sentence-transformers' ``mine_hard_negatives``, like with like.

    python benchmarks/mining.py                       # cranfield, cisi, med
    python benchmarks/mining.py --collections adi --num-negatives 3

Three miners, each in a fresh subprocess, all with all-MiniLM-L6-v2 on the CPU, the same
number of negatives and the same single positive per judged query (a seeded choice among the
judged-relevant documents, as a synthetic query knows only its source document):

- rankmill with its defaults (BM25 + dense pool, negatives from the dense ranking to depth
  1000, a negative must score below 95% of the positive, near-duplicates of the positive or of
  an earlier pick turned down), run on its in-process engine
  (:class:`rankmill.retrieval.miner.Miner`, what the ``mine`` stage runs);
- sentence-transformers at rankmill's settings (``relative_margin=0.05``, ``range_max=1000``,
  ``sampling_strategy="top"``): "st same";
- sentence-transformers with its defaults: "st default".

Both get the exclusions (cranfield's source documents): sentence-transformers has no such
argument, so it is asked for as many more negatives as a query has exclusions and the
excluded ones are dropped, which with ``top`` sampling is the same thing. False negatives are
counted the same way for all (a mined negative that the judgments mark relevant; a lower
bound, judgments being incomplete), and so is hardness: the mean cosine of a negative to its
query and its mean rank in the query's full dense ranking, both from rankmill's embeddings.
Time is from "model loaded" to "negatives out", embedding included; search time is that
minus the time spent inside the model's ``encode`` (BM25, fusion, filters, sampling).

Last line: ``summary: time_ratio=… search_time_ratio=… fn_rate=… fn_rate_st_same=…
fn_rate_st_default=… kept_ratio_same=… sim=… sim_st_same=… rank=… rank_st_same=…``
(ratios are rankmill / st same, pooled over the collections run).
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
sys.path.insert(0, str(HERE.parent))  # tests.fixtures
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


def timed_encode(model) -> list[float]:  # type: ignore[no-untyped-def]
    """Wrap ``model.encode`` to add up the seconds spent in it."""
    spent = [0.0]
    encode = model.encode

    def wrapper(*a, **k):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        try:
            return encode(*a, **k)
        finally:
            spent[0] += time.perf_counter() - t

    model.encode = wrapper
    return spent


# -- workers (each in its own process) ----------------------------------------------------------
def worker_st(args: argparse.Namespace) -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from rankmill.retrieval.dense import resolve_model
    from rankmill.retrieval.miner import doc_text
    from tests.fixtures.judged import load, one_positive

    coll = load(args.collection)
    pos = one_positive(coll, args.seed)
    texts = [doc_text(t, x) for t, x in zip(coll.titles, coll.texts, strict=True)]
    ids_of_text: dict[str, list[str]] = {}
    for d, t in zip(coll.doc_ids, texts, strict=True):
        ids_of_text.setdefault(t, []).append(d)
    text_of = dict(zip(coll.doc_ids, texts, strict=True))
    qids = sorted(pos)
    ds = Dataset.from_dict(
        {"query": [coll.queries[q] for q in qids], "positive": [text_of[pos[q]] for q in qids]}
    )
    extra = max((len(coll.excluded.get(q, ())) for q in qids), default=0)
    settings: dict = {}
    if args.worker == "st_same":
        settings = {"relative_margin": 0.05, "range_max": 1000, "sampling_strategy": "top"}
    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    spent = timed_encode(model)
    with PeakRSS() as mem:
        t0 = time.perf_counter()
        out = mine_hard_negatives(
            ds,
            model,
            anchor_column_name="query",
            positive_column_name="positive",
            corpus=texts,
            num_negatives=args.num_negatives + extra,
            output_format="n-tuple",
            verbose=False,
            **settings,
        )
        seconds = time.perf_counter() - t0
    negatives: dict[str, list[str]] = {}
    by_query: dict[str, list[str]] = {}
    for q in qids:
        by_query.setdefault(coll.queries[q], []).append(q)
    neg_cols = [c for c in out.column_names if c.startswith("negative")]
    for row in out:
        for q in by_query[row["query"]]:
            picked: list[str] = []
            for c in neg_cols:
                # A duplicated text stands for all its ids; relevant if any of them is.
                ids = ids_of_text[row[c]]
                if any(d in coll.excluded.get(q, ()) for d in ids):
                    continue
                rel = [d for d in ids if d in coll.relevant.get(q, ())]
                picked.append(rel[0] if rel else ids[0])
            if picked:
                negatives[q] = picked[: args.num_negatives]
    return {
        "seconds": seconds,
        "search_seconds": seconds - spent[0],
        "peak_mb": mem.peak / 2**20,
        "queries": len(qids),
        "negatives_by_query": negatives,
    }


def worker_rankmill(args: argparse.Namespace) -> dict:
    import numpy as np

    from rankmill.retrieval.miner import MineQuery, Miner, MiningParams
    from tests.fixtures.judged import load, one_positive

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
        spent = timed_encode(miner.encoder.model) if miner.encoder else [0.0]
        with PeakRSS() as mem:
            t0 = time.perf_counter()
            miner.index_corpus(coll.doc_ids, coll.titles, coll.texts, root=cache)
            res = miner.mine(qs)
            seconds = time.perf_counter() - t0
        encode_s = spent[0]
        # The embeddings every miner's negatives are measured with.
        if miner.emb is not None and args.emb_out:
            q_emb = miner.encoder.encode_queries([q.text for q in qs])
            np.savez(
                args.emb_out,
                docs=np.asarray(miner.emb),
                queries=q_emb,
                qids=np.array([q.query_id for q in qs]),
                doc_ids=np.array(miner.doc_ids),
            )
    skipped: dict[str, int] = {}
    for m in res:
        for k, v in m.skipped.items():
            skipped[k] = skipped.get(k, 0) + v
    return {
        "seconds": seconds,
        "search_seconds": seconds - encode_s,
        "peak_mb": mem.peak / 2**20,
        "queries": len(qs),
        "negatives_by_query": {m.query_id: m.negative_ids for m in res if m.negative_ids},
        "skipped": skipped,
        "considered": sum(m.considered for m in res),
        "full_ranking": sum(m.full_ranking for m in res),
        "docs": len(coll.doc_ids),
        "timings": miner.timings,
    }


def measure(coll, r: dict, emb) -> dict:  # type: ignore[no-untyped-def]
    """False negatives, mean cosine and mean dense rank of one miner's negatives."""
    import numpy as np

    negs = r["negatives_by_query"]
    row = {d: i for i, d in enumerate(emb["doc_ids"].tolist())}
    qrow = {q: i for i, q in enumerate(emb["qids"].tolist())}
    sims: list[float] = []
    ranks: list[int] = []
    for q, ds in negs.items():
        scores = emb["docs"] @ emb["queries"][qrow[q]]
        order = np.argsort(-scores, kind="stable")
        rank_of = np.empty(len(order), dtype=np.int64)
        rank_of[order] = np.arange(1, len(order) + 1)
        for d in ds:
            sims.append(float(scores[row[d]]))
            ranks.append(int(rank_of[row[d]]))
    return {
        **score(coll, negs),
        "kept": len(negs),
        "mean_sim": float(np.mean(sims)) if sims else float("nan"),
        "mean_rank": float(np.mean(ranks)) if ranks else float("nan"),
    }


# -- driver -----------------------------------------------------------------------------------
def run_worker(kind: str, collection: str, args: argparse.Namespace, emb_out: str = "") -> dict:
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
        "--emb-out",
        emb_out,
    ]
    for kv in args.set or []:
        cmd += ["--set", kv]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{kind} on {collection} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


MINERS = (("rankmill", "rankmill"), ("st same", "st_same"), ("st default", "st_default"))


def main() -> None:
    import numpy as np

    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--collections", nargs="+", default=["cranfield", "cisi", "med"])
    ap.add_argument("--num-negatives", type=int, default=3, help="sentence-transformers' default")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--set", action="append", help="rankmill MiningParams override key=json")
    ap.add_argument(
        "--worker", choices=["st_same", "st_default", "rankmill"], help=argparse.SUPPRESS
    )
    ap.add_argument("--collection", help=argparse.SUPPRESS)
    ap.add_argument("--emb-out", default="", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        fn = worker_rankmill if args.worker == "rankmill" else worker_st
        print(json.dumps(fn(args)))
        return

    from tests.fixtures.judged import DATA, load

    if not DATA.is_dir():
        sys.exit(f"{DATA} is not there: this benchmark needs ../shared/data (see its README)")
    print(
        f"mining benchmark: all-MiniLM-L6-v2 on CPU, {args.num_negatives} negatives, one "
        f"seeded positive per judged query (seed {args.seed}); "
        f"rankmill overrides: {args.set or 'none'}"
    )
    totals: dict[str, dict[str, float]] = {k: {} for _, k in MINERS}

    def add(kind: str, key: str, v: float) -> None:
        totals[kind][key] = totals[kind].get(key, 0.0) + v

    with tempfile.TemporaryDirectory() as tmp:
        for name in args.collections:
            coll = load(name)
            emb_path = os.path.join(tmp, f"{name}.npz")
            results = {"rankmill": run_worker("rankmill", name, args, emb_path)}
            results["st_same"] = run_worker("st_same", name, args)
            results["st_default"] = run_worker("st_default", name, args)
            emb = np.load(emb_path)
            rm = results["rankmill"]
            print(f"\n{name}: {rm['docs']} docs, {rm['queries']} judged queries")
            cols = [("time s", 8), ("search s", 9), ("kept", 6), ("negs", 6), ("FN", 5)]
            cols += [("FN rate", 9), ("excl used", 10), ("mean sim", 10), ("mean rank", 10)]
            print(f"  {'miner':<12}" + "".join(f"{c:>{w}}" for c, w in cols))
            for label, kind in MINERS:
                r = results[kind]
                m = measure(coll, r, emb)
                rate = m["false_negatives"] / max(1, m["negatives"])
                vals = [f"{r['seconds']:.2f}", f"{r['search_seconds']:.2f}"]
                vals += [str(m[k]) for k in ("kept", "negatives", "false_negatives")]
                vals += [f"{rate:.3f}", str(m["excluded_used"])]
                vals += [f"{m['mean_sim']:.3f}", f"{m['mean_rank']:.1f}"]
                print(
                    f"  {label:<12}"
                    + "".join(f"{v:>{w}}" for v, (_, w) in zip(vals, cols, strict=True))
                )
                for key in ("seconds", "search_seconds"):
                    add(kind, key, r[key])
                for key in ("kept", "negatives", "false_negatives"):
                    add(kind, key, m[key])
                add(kind, "sim_sum", m["mean_sim"] * m["negatives"])
                add(kind, "rank_sum", m["mean_rank"] * m["negatives"])
            print(
                "  rankmill stages: "
                + ", ".join(f"{k} {v:.2f}s" for k, v in rm["timings"].items())
                + f"; {rm['full_ranking']} queries ranked the whole corpus"
            )
            from rankmill.retrieval.filters import describe_skips

            for line in describe_skips(rm["skipped"], rm["considered"]):
                print(f"  rankmill {line}")

    def rate(kind: str) -> float:
        return totals[kind]["false_negatives"] / max(1, totals[kind]["negatives"])

    def mean(kind: str, key: str) -> float:
        return totals[kind][key] / max(1, totals[kind]["negatives"])

    rm, same = totals["rankmill"], totals["st_same"]
    summary = {
        "time_ratio": rm["seconds"] / same["seconds"],
        "search_time_ratio": rm["search_seconds"] / max(1e-9, same["search_seconds"]),
        "fn_rate": rate("rankmill"),
        "fn_rate_st_same": rate("st_same"),
        "fn_rate_st_default": rate("st_default"),
        "kept_ratio_same": rm["kept"] / max(1, same["kept"]),
        "sim": mean("rankmill", "sim_sum"),
        "sim_st_same": mean("st_same", "sim_sum"),
        "rank": mean("rankmill", "rank_sum"),
        "rank_st_same": mean("st_same", "rank_sum"),
    }
    print("summary: " + " ".join(f"{k}={v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
