"""Benchmark: what the stages deliver through ``rankmill run``, against the engines alone.

    python benchmarks/pipeline_speed.py                 # cranfield, 10,000 label calls
    python benchmarks/pipeline_speed.py --label-docs 10 # a smaller label stage

Everything rankmill does here goes through ``rankmill run`` on fresh run directories:

1. ``mine`` on cranfield (all-MiniLM-L6-v2, margin 0.95 of the positive, depth 1000, 8
   negatives) with an empty embedding cache, against sentence-transformers'
   ``mine_hard_negatives`` with the same model, ``relative_margin=0.05``, ``range_max=1000``
   and 8 negatives in a fresh process. Both sides embed the corpus and the queries.
   ``stage_time_ratio`` compares fresh process with fresh process: the wall time of ``rankmill
   run`` (ingest already committed: start-up, Ray, actors, model loading, embedding, BM25,
   mining, commits) against that of the sentence-transformers process (start-up, imports,
   reading the collection, model loading, embedding, mining). The table also shows the mine
   stage's own wall against sentence-transformers' time from loading the model to the
   negatives.
2. The same stage with ``retrievers: [bm25]`` (no dense model at all).
3. A label stage of about 10,000 calls (the BM25 pools of cranfield's 225 queries) against
   the fake OpenAI server at near-zero latency, then the same stage re-planned with
   ``rows_per_unit`` 32 instead of 64 after its committed units are removed (every answer is
   in the run's journal, no call is sent). CPU
   is the CPU time of the CLI and every process it started (Ray included), per call.

Last line: ``summary: stage_time_ratio=… embed_docs_per_s=… st_embed_docs_per_s=…
bm25_only_s=… dense_s=… replan_ratio=… cpu_ms_per_call=…``.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

NEGATIVES = 8


class TreeCPU:
    """CPU seconds of a process and all its descendants, sampled so that children that exit
    before the end still count."""

    def __init__(self, pid: int, every_s: float = 0.2):
        import psutil

        self.root = psutil.Process(pid)
        self.every_s = every_s
        self.seen: dict[int, float] = {}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _sample(self) -> None:
        import psutil

        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            return
        for p in procs:
            try:
                t = p.cpu_times()
                self.seen[p.pid] = t.user + t.system + t.children_user + t.children_system
            except psutil.Error:
                pass

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            time.sleep(self.every_s)

    def stop(self) -> float:
        self._sample()
        self._stop.set()
        self._t.join()
        return sum(self.seen.values())


def rankmill(args: list[str], cpu: bool = False) -> tuple[float, float]:
    """Run ``rankmill ARGS``; (wall seconds, CPU seconds of its process tree)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src"), str(REPO)]))
    t0 = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "rankmill.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    meter = TreeCPU(proc.pid) if cpu else None
    out, _ = proc.communicate()
    wall = time.perf_counter() - t0
    cpu_s = meter.stop() if meter else 0.0
    if proc.returncode != 0:
        sys.exit(f"rankmill {' '.join(args)} failed:\n{out[-3000:]}")
    return wall, cpu_s


def stage_wall(run_dir: Path, stage: str) -> float:
    record = json.loads((run_dir / "stages" / stage / "last_run.json").read_text())
    return float(record["wall_seconds"])


def index_timings(run_dir: Path) -> dict:
    [path] = glob.glob(str(run_dir / "stages" / "mine" / "files" / "*" / "index.json"))
    return json.loads(Path(path).read_text())


def pipeline(data: Path, mine: dict, label: dict | None = None, base_url: str = "") -> str:
    import yaml

    cfg: dict = {
        "run": {"name": "pipeline-speed"},
        "stages": {"ingest": {"source": str(data)}, "mine": mine},
    }
    if label is not None:
        cfg["endpoints"] = {"fake": {"base_url": base_url, "model": "fake", "max_concurrency": 64}}
        cfg["stages"]["label"] = label
    return yaml.safe_dump(cfg, sort_keys=False)  # stages run in the order they are listed


# -- sentence-transformers, in its own process -------------------------------------------------
def worker_st() -> dict:
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.util import mine_hard_negatives

    from rankmill.retrieval.dense import resolve_model
    from rankmill.retrieval.miner import doc_text
    from tests.fixtures.judged import load, one_positive

    coll = load("cranfield")
    pos = one_positive(coll, 13)
    texts = [doc_text(t, x) for t, x in zip(coll.titles, coll.texts, strict=True)]
    text_of = dict(zip(coll.doc_ids, texts, strict=True))
    qids = sorted(pos)
    ds = Dataset.from_dict(
        {"query": [coll.queries[q] for q in qids], "positive": [text_of[pos[q]] for q in qids]}
    )
    t0 = time.perf_counter()
    model = SentenceTransformer(resolve_model("all-MiniLM-L6-v2"), device="cpu")
    calls: list[tuple[int, float]] = []
    encode = model.encode

    def timed(*a, **k):  # type: ignore[no-untyped-def]
        t = time.perf_counter()
        out = encode(*a, **k)
        texts = a[0] if a else next(v for v in k.values() if isinstance(v, list))
        calls.append((len(texts), time.perf_counter() - t))
        return out

    model.encode = timed  # type: ignore[method-assign]
    mine_hard_negatives(
        ds,
        model,
        corpus=texts,
        num_negatives=NEGATIVES,
        relative_margin=0.05,
        range_max=1000,
        verbose=False,
    )
    seconds = time.perf_counter() - t0
    n, t = max(calls)  # the corpus: the largest encode call
    import torch

    return {"seconds": seconds, "corpus_texts": n, "embed_s": t, "threads": torch.get_num_threads()}


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--label-docs", type=int, default=45, help="candidates labelled per query")
    ap.add_argument("--worker", choices=["st"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        import logging

        logging.disable(logging.WARNING)
        print(json.dumps(worker_st()))
        return

    from tests.fixtures.judged import DATA

    data = DATA / "cranfield"
    if not data.is_dir():
        sys.exit(f"{data} is not there: this benchmark needs ../shared/data (see its README)")
    from tests.fixtures.openai_server import FakeOpenAIServer

    mine = {"num_negatives": NEGATIVES}
    print(f"pipeline speed on cranfield ({os.cpu_count()} CPUs), everything via `rankmill run`")
    with tempfile.TemporaryDirectory(prefix="rankmill-speed-") as tmp:
        root = Path(tmp)

        def fresh(name: str, yaml_text: str) -> tuple[Path, Path]:
            (root / name).mkdir()
            p = root / name / "p.yaml"
            p.write_text(yaml_text)
            return p, root / name / "run"

        # 1. dense mine vs sentence-transformers
        p, run = fresh("dense", pipeline(data, mine))
        rankmill(["run", str(p), "--run-dir", str(run), "--until", "ingest"])
        dense_cli, _ = rankmill(["run", str(p), "--run-dir", str(run)])
        dense_s = stage_wall(run, "mine")
        timings = index_timings(run)
        embed_s = timings["timings"]["embed_s"]
        docs = timings["docs"]
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", "st"], capture_output=True, text=True
        )
        st_process_s = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.exit(f"sentence-transformers worker failed:\n{proc.stderr[-3000:]}")
        st = json.loads(proc.stdout.strip().splitlines()[-1])

        # 2. BM25 only
        p, run = fresh("bm25", pipeline(data, {**mine, "retrievers": ["bm25"]}))
        rankmill(["run", str(p), "--run-dir", str(run), "--until", "ingest"])
        bm25_cli, _ = rankmill(["run", str(p), "--run-dir", str(run)])
        bm25_s = stage_wall(run, "mine")

        # 3. label: ~10,000 calls, then re-planned with every answer journaled
        with FakeOpenAIServer(answer_mode="yesno") as srv:
            label = {
                "endpoint": "fake",
                "answer_format": "word",
                "max_docs_per_query": args.label_docs,
                "rows_per_unit": 64,
            }
            bm25_mine = {**mine, "retrievers": ["bm25"], "pool_size": args.label_docs}
            p, run = fresh("label", pipeline(data, bm25_mine, label, srv.base_url))
            rankmill(["run", str(p), "--run-dir", str(run), "--until", "mine"])
            label_cli, cpu_s = rankmill(["run", str(p), "--run-dir", str(run)], cpu=True)
            label_s = stage_wall(run, "label")
            calls = srv.completed()
            # The unit size changes no output (it is not fingerprinted): a complete stage would
            # be skipped. Its committed units are removed, so it is planned again into other
            # units; every answer is still in the run's LLM journal.
            shutil.rmtree(run / "stages" / "label")
            replan_cli, _ = rankmill(
                ["run", str(p), "--run-dir", str(run), "--set", "stages.label.rows_per_unit=32"]
            )
            replan_s = stage_wall(run, "label")
            after = srv.completed()

    print(f"\n  {'what':<52}{'seconds':>10}{'CLI wall':>10}")
    rows = [
        ("mine, dense, empty cache (stage wall)", dense_s, dense_cli),
        ("sentence-transformers mine_hard_negatives (same settings)", st["seconds"], st_process_s),
        ("mine, retrievers: [bm25]", bm25_s, bm25_cli),
        (f"label, {calls} calls at ~0 latency", label_s, label_cli),
        (f"label re-planned (rows_per_unit 32), {after - calls} calls sent", replan_s, replan_cli),
    ]
    for what, s, cli in rows:
        print(f"  {what:<52}{s:>10.1f}{(f'{cli:.1f}' if cli else '-'):>10}")
    print(
        f"  embedding: rankmill {docs} docs in {embed_s:.1f}s; sentence-transformers "
        f"{st['corpus_texts']} texts in {st['embed_s']:.1f}s ({st['threads']} torch threads)"
    )
    print(
        "  (rankmill's CLI wall and sentence-transformers' process wall both start a fresh "
        "process: imports, Ray or not, model loading, embedding, mining; the seconds column "
        "is the mine stage's own wall and sentence-transformers' time from loading the model "
        f"to the negatives: ratio {dense_s / st['seconds']:.2f})"
    )
    summary = {
        "stage_time_ratio": dense_cli / st_process_s,
        "embed_docs_per_s": docs / embed_s,
        "st_embed_docs_per_s": st["corpus_texts"] / st["embed_s"],
        "bm25_only_s": bm25_s,
        "dense_s": dense_s,
        "replan_ratio": replan_s / label_s,
        "cpu_ms_per_call": 1000 * cpu_s / max(1, calls),
    }
    print("summary: " + " ".join(f"{k}={v:.3f}" for k, v in summary.items()))


if __name__ == "__main__":
    main()
