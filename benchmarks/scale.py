"""Scale: memory, CPU per LLM call, journal open time, resume time and endpoint utilization of
a whole pipeline run through ``rankmill run``.

Claim: at 1M documents the driver stays under 2 GiB and the run fits a 24 GiB machine;
opening a journal of 1M entries takes ≤ 2 s; the label stage keeps a 1 s endpoint at ≥ 0.9 of
its concurrency; CPU per LLM call at pipeline level stays within 1.5x the gateway's own
(``benchmarks/llm_throughput.py``).

What it does, everything through the CLI (so it measures whatever the runner does):

1. writes a BEIR folder of ``--docs`` short passages and ``--queries`` queries (each made
   from words of one passage, which is its judged positive);
2. ``rankmill run --until mine``: ingest and BM25-only mining (``retrievers: [bm25]``);
3. ``rankmill run``: the label stage against the fake OpenAI server at ``--latency`` (near
   zero), SIGKILLed once when ``--kill-at`` of its calls are answered; then run again
   (``resume_s``: the resumed run's wall time) and checked: every pair labeled, and only
   requests in flight at the kill sent twice;
4. the label stage again with another temperature (new request keys, no kill): worker and
   driver CPU per call (``cpu_ms_per_call``: the stage's Ray workers' CPU ÷ calls; the CPU
   of a journal hit is measured by ``benchmarks/llm_throughput.py``);
5. the label stage again against a server answering in 1 s, ``max_concurrency:
   --util-concurrency``: ``utilization`` = calls/s over the stage's wall time ÷ (concurrency
   ÷ latency);
6. a journal of ``--journal-entries`` entries written directly (as ``--journal-writers``
   writers would leave it), then opened in a fresh process: ``journal_open_s`` (open + one
   hit + one miss), its peak RSS, and µs per lookup; beside it, the JSON-lines journal of
   older versions (whole journal parsed into a dict per gateway) at ``--legacy-entries``.

Peak RSS: the CLI process (the driver) and the largest Ray worker process of its process
tree, polled every 0.2 s.

    python benchmarks/scale.py [--docs 20000] [--queries 2000] [--docs-per-query 4]
        [--journal-entries 1000000] [--workdir DIR] [--keep]

Last line: ``summary: docs=… calls=… driver_peak_gib=… worker_peak_gib=… cpu_ms_per_call=…
journal_open_s=… resume_s=… utilization=…``
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "src"))

from tests.fixtures.openai_server import spawn_server  # noqa: E402

GIB = 2**30


# -- data ----------------------------------------------------------------------------------------
def write_collection(root: Path, docs: int, queries: int, seed: int) -> None:
    """A BEIR folder: passages of 30-60 words from a 20k-word vocabulary, and queries of 4-7
    words drawn from one passage each (its judged positive)."""
    rng = random.Random(seed)
    vocab = [f"w{i:05d}" for i in range(20000)]
    # Zipf-like: a few common words (cumulative weights, computed once: same draws as weights)
    cum = list(itertools.accumulate(1.0 / (i + 10) for i in range(len(vocab))))
    root.mkdir(parents=True, exist_ok=True)
    (root / "qrels").mkdir(exist_ok=True)
    picked = set(rng.sample(range(docs), min(queries, docs)))
    q_lines, qrels = [], ["query-id\tcorpus-id\tscore"]
    with open(root / "corpus.jsonl", "w") as f:
        for d in range(docs):
            words = rng.choices(vocab, cum_weights=cum, k=rng.randint(30, 60))
            f.write(json.dumps({"_id": f"d{d}", "title": "", "text": " ".join(words)}) + "\n")
            if d in picked:
                q = f"q{len(q_lines)}"
                q_lines.append(json.dumps({"_id": q, "text": " ".join(rng.sample(words, 5))}))
                qrels.append(f"{q}\td{d}\t1")
    (root / "queries.jsonl").write_text("\n".join(q_lines) + "\n")
    (root / "qrels" / "test.tsv").write_text("\n".join(qrels) + "\n")


def pipeline_yaml(data: Path, url: str, concurrency: int, args: argparse.Namespace) -> str:
    return f"""
run: {{name: scale, seed: 13}}
endpoints:
  fake: {{base_url: "{url}", model: fake, max_concurrency: {concurrency}, timeout_s: 120}}
stages:
  ingest: {{source: "{data}"}}
  mine: {{retrievers: [bm25], num_negatives: 4}}
  label: {{endpoint: fake, answer_format: word, samples: 1,
          max_docs_per_query: {args.docs_per_query}, rows_per_unit: {args.rows_per_unit},
          workers: {args.label_workers}}}
"""


# -- watching a CLI run --------------------------------------------------------------------------
class Watch:
    """Polls a process tree: peak RSS of the root (driver) and of any Ray worker, and the CPU
    time of each process as last seen."""

    def __init__(self, root_pid: int):
        self.root = psutil.Process(root_pid)
        self.driver_peak = 0
        self.worker_peak = 0
        self.cpu: dict[int, tuple[str, float]] = {}  # pid -> (kind, user+system s)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _kind(self, p: psutil.Process) -> str:
        if p.pid == self.root.pid:
            return "driver"
        try:
            name = " ".join(p.cmdline()[:1])
        except psutil.Error:
            return "other"
        if name.startswith("ray::") and "IDLE" not in name:
            return "worker"
        return "ray-system" if "ray" in name else "other"

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                procs = [self.root, *self.root.children(recursive=True)]
            except psutil.Error:
                procs = []
            for p in procs:
                try:
                    with p.oneshot():
                        rss = p.memory_info().rss
                        t = p.cpu_times()
                        kind = self._kind(p)
                except psutil.Error:
                    continue
                # A Ray worker is named ray::IDLE until it hosts an actor and may be named so
                # again after: once seen as a worker it stays one.
                if self.cpu.get(p.pid, ("",))[0] == "worker":
                    kind = "worker"
                self.cpu[p.pid] = (kind, t.user + t.system)
                if kind == "driver":
                    self.driver_peak = max(self.driver_peak, rss)
                elif kind == "worker":
                    self.worker_peak = max(self.worker_peak, rss)
            self._stop.wait(0.2)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def cpu_by_kind(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for kind, s in self.cpu.values():
            out[kind] = out.get(kind, 0.0) + s
        return out


def cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), str(REPO), env.get("PYTHONPATH", "")) if p
    )
    return subprocess.Popen(
        [sys.executable, "-m", "rankmill.cli", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def run_cli(args: list[str], cwd: Path, kill_when: Any = None) -> tuple[float, Watch, bool, str]:
    """Run ``rankmill ARGS``; with ``kill_when`` (a callable), SIGKILL its process group once
    it returns True. Returns (wall s, watch, killed, output)."""
    t0 = time.perf_counter()
    proc = cli(args, cwd)
    watch = Watch(proc.pid)
    out: list[bytes] = []
    reader = threading.Thread(target=lambda: out.append(proc.stdout.read()), daemon=True)
    reader.start()
    killed = False
    while proc.poll() is None:
        if kill_when is not None and not killed and kill_when():
            os.killpg(proc.pid, signal.SIGKILL)
            killed = True
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    watch.stop()
    reader.join()
    text = b"".join(out).decode(errors="replace")
    if proc.returncode != 0 and not killed:
        raise SystemExit(f"rankmill {' '.join(args)} failed ({proc.returncode}):\n{text[-4000:]}")
    return wall, watch, killed, text


def stage_wall(run_dir: Path, stage: str) -> float:
    return float(
        json.loads((run_dir / "stages" / stage / "last_run.json").read_text())["wall_seconds"]
    )


def label_rows(run_dir: Path) -> tuple[int, int]:
    from rankmill.manifest import RunDir

    rd = RunDir(str(run_dir))
    return rd.read_table("label", "labels").num_rows, rd.read_table("label", "rejects").num_rows


# -- the journal at a million entries ------------------------------------------------------------
def _entry(i: int) -> dict:
    return {
        "v": 1,
        "key": f"{i:064x}",
        "ep": "http://127.0.0.1:8000/v1",
        "model": "fake",
        "ok": True,
        "reason": None,
        "detail": None,
        "text": "yes",
        "finish_reason": "stop",
        "logprobs": [
            {
                "token": "yes",
                "logprob": -0.105,
                "top_logprobs": [
                    {"token": t, "logprob": -0.1 * k}
                    for k, t in enumerate(["yes", "no", "Yes", "No", " yes"])
                ],
            }
        ],
        "prompt_tokens": 180,
        "completion_tokens": 1,
        "cost_usd": 0.0,
        "seed": i,
        "sample_index": 0,
        "stage": "label",
        "t": 1.7e9,
    }


def build_journal(run_dir: str, entries: int, writers: int) -> float:
    """Write ``entries`` journal entries as ``writers`` writers would; returns seconds."""
    from rankmill.llm.journal import Journal, _row

    t0 = time.perf_counter()
    per = -(-entries // writers)
    for w in range(writers):
        j = Journal(run_dir, writer_id=f"bench-{w}")
        lo, hi = w * per, min(entries, (w + 1) * per)
        for start in range(lo, hi, 20000):
            j._write_durably([_row(_entry(i)) for i in range(start, min(hi, start + 20000))])
        j.close()
    return time.perf_counter() - t0


OPEN_PROBE = """
import json, random, resource, sys, time
sys.path.insert(0, {src!r})
t0 = time.perf_counter()
from rankmill.llm.journal import Journal
t_import = time.perf_counter() - t0
t0 = time.perf_counter()
j = Journal({run_dir!r})
hit = j.get({hit!r})
miss = j.get("f" * 64)
open_s = time.perf_counter() - t0
assert hit is not None and miss is None
rng = random.Random(0)
keys = [f"{{rng.randrange({n}):064x}}" for _ in range(20000)]
t0 = time.perf_counter()
assert all(j.get(k) is not None for k in keys)
per = (time.perf_counter() - t0) / len(keys)
print(json.dumps({{"open_s": open_s, "lookup_us": per * 1e6, "entries": len(j),
                   "segments": j.segment_count(),
                   "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""

LEGACY_PROBE = """
import json, resource, sys, time
sys.path.insert(0, {src!r})
import orjson
t0 = time.perf_counter()
entries = {{}}
for path in {paths!r}:
    with open(path, "rb") as f:
        for line in f:
            e = orjson.loads(line)
            entries[e["key"]] = e
open_s = time.perf_counter() - t0
print(json.dumps({{"open_s": open_s, "entries": len(entries),
                   "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}}))
"""


def probe(code: str) -> dict:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr)
    return json.loads(out.stdout.strip().splitlines()[-1])


def journal_figures(work: Path, entries: int, writers: int, legacy: int) -> dict:
    run_dir = str(work / "journal-run")
    build_s = build_journal(run_dir, entries, writers)
    size = sum(p.stat().st_size for p in Path(run_dir, "llm", "journal").glob("*.sqlite"))
    new = probe(
        OPEN_PROBE.format(
            src=str(REPO / "src"), run_dir=run_dir, hit=f"{entries // 2:064x}", n=entries
        )
    )
    # What older versions did at every gateway start: parse every JSON line into one dict.
    import orjson

    legacy_dir = work / "legacy"
    legacy_dir.mkdir(exist_ok=True)
    paths = []
    per = -(-legacy // writers)
    for w in range(writers):
        p = legacy_dir / f"w{w}.jsonl"
        with open(p, "wb") as f:
            for i in range(w * per, min(legacy, (w + 1) * per)):
                f.write(orjson.dumps(_entry(i)) + b"\n")
        paths.append(str(p))
    old = probe(LEGACY_PROBE.format(src=str(REPO / "src"), paths=paths))
    shutil.rmtree(run_dir, ignore_errors=True)
    shutil.rmtree(legacy_dir, ignore_errors=True)
    return {"build_s": build_s, "bytes": size, "new": new, "old": old}


# -- main ----------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=20000)
    ap.add_argument("--queries", type=int, default=2000)
    ap.add_argument("--docs-per-query", type=int, default=4)
    ap.add_argument("--rows-per-unit", type=int, default=256)
    ap.add_argument("--label-workers", type=int, default=1)
    ap.add_argument("--concurrency", type=int, default=64, help="near-zero latency runs")
    ap.add_argument("--latency", type=float, default=0.0)
    ap.add_argument("--kill-at", type=float, default=0.4, help="share of label calls")
    ap.add_argument("--util-latency", type=float, default=1.0)
    ap.add_argument("--util-concurrency", type=int, default=128)
    ap.add_argument("--journal-entries", type=int, default=1_000_000)
    ap.add_argument("--journal-writers", type=int, default=4)
    ap.add_argument("--legacy-entries", type=int, default=200_000)
    ap.add_argument("--workdir", default=None, help="default: a new folder in the current one")
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()

    parent = Path(args.workdir or os.getcwd())
    parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".bench-scale-", dir=parent))
    data, run_dir = work / "data", work / "run"
    rows: list[tuple[str, str]] = []
    try:
        t0 = time.perf_counter()
        write_collection(data, args.docs, args.queries, seed=7)
        rows.append(("collection written", f"{time.perf_counter() - t0:.1f} s"))
        fast = spawn_server(cwd=str(REPO), latency_s=args.latency, answer_mode="yesno")
        slow = spawn_server(cwd=str(REPO), latency_s=args.util_latency, answer_mode="yesno")
        try:
            yaml = work / "scale.yaml"
            yaml.write_text(pipeline_yaml(data, fast.base_url, args.concurrency, args))
            base = ["run", str(yaml), "--run-dir", str(run_dir)]

            # ingest + BM25-only mining
            wall, w, _, _ = run_cli([*base, "--until", "mine"], work)
            driver_peak, worker_peak = w.driver_peak, w.worker_peak
            rows.append(
                (
                    "ingest + mine",
                    f"{wall:.1f} s, driver {w.driver_peak / GIB:.2f} GiB, "
                    f"worker {w.worker_peak / GIB:.2f} GiB",
                )
            )

            # label, killed once mid-stage, then resumed
            calls = args.queries * args.docs_per_query  # an upper bound: pools may be shorter
            wall_k, w, killed, _ = run_cli(
                base, work, kill_when=lambda: fast.completed() >= args.kill_at * calls
            )
            at_kill = fast.completed()
            time.sleep(1.0)
            resume_s, w2, _, _ = run_cli(base, work)
            labels, rejects = label_rows(run_dir)
            stats = fast.stats()["completed"]
            sent = len(stats)
            repeated = sum(1 for v in stats.values() if v > 1)
            driver_peak = max(driver_peak, w.driver_peak, w2.driver_peak)
            worker_peak = max(worker_peak, w.worker_peak, w2.worker_peak)
            assert killed, "the label stage ended before the kill point"
            assert labels + rejects == sent, (labels, rejects, sent)
            rows.append(("label, killed", f"after {wall_k:.1f} s at {at_kill} answers"))
            rows.append(
                (
                    "label, resumed",
                    f"{resume_s:.1f} s; {labels} labels, {rejects} "
                    f"rejects, {sent} distinct calls, {repeated} sent twice (in flight); "
                    f"driver {max(w.driver_peak, w2.driver_peak) / GIB:.2f} GiB, "
                    f"worker {max(w.worker_peak, w2.worker_peak) / GIB:.2f} GiB",
                )
            )

            # a clean label run: CPU per call
            fast.reset()
            wall, w, _, _ = run_cli([*base, "--set", "stages.label.temperature=0.3"], work)
            n_calls = fast.completed()
            cpu = w.cpu_by_kind()
            cpu_ms = 1000 * cpu.get("worker", 0.0) / max(1, n_calls)
            driver_cpu_ms = 1000 * cpu.get("driver", 0.0) / max(1, n_calls)
            label_s = stage_wall(run_dir, "label")
            driver_peak = max(driver_peak, w.driver_peak)
            worker_peak = max(worker_peak, w.worker_peak)
            rows.append(
                (
                    "label, clean",
                    f"{n_calls} calls in {label_s:.1f} s "
                    f"({n_calls / label_s:.0f}/s), worker CPU {cpu_ms:.2f} ms/call, driver "
                    f"{driver_cpu_ms:.2f} ms/call, Ray system "
                    f"{1000 * cpu.get('ray-system', 0.0) / max(1, n_calls):.2f} ms/call",
                )
            )

            # utilization at 1 s latency and concurrency 128, the whole stage
            util_yaml = work / "util.yaml"
            util_yaml.write_text(pipeline_yaml(data, slow.base_url, args.util_concurrency, args))
            wall, w, _, _ = run_cli(
                [
                    "run",
                    str(util_yaml),
                    "--run-dir",
                    str(run_dir),
                    "--set",
                    "stages.label.temperature=0.6",
                ],
                work,
            )
            u_stats = slow.stats()
            u_calls = sum(u_stats["completed"].values())
            u_s = stage_wall(run_dir, "label")
            limit = args.util_concurrency / args.util_latency
            utilization = u_calls / u_s / limit
            last = json.loads((run_dir / "stages" / "label" / "last_run.json").read_text())
            start = last["finished_at"] - last["wall_seconds"]
            arrivals = sorted(t for t, _ in u_stats["arrivals"])
            first = arrivals[0] - start
            # steady state: requests sent between the first and the last full latency period
            lo, hi = arrivals[0] + 2 * args.util_latency, arrivals[-1] - args.util_latency
            steady = sum(1 for t in arrivals if lo <= t < hi) / max(1e-9, hi - lo)
            rows.append(
                (
                    "label, 1 s latency",
                    f"{u_calls} calls in {u_s:.1f} s: {u_calls / u_s:.1f}/s of {limit:.0f}/s; "
                    f"first request {first:.1f} s after the stage started (Ray start, actors, "
                    f"planning), then {steady:.1f}/s sent in steady state",
                )
            )
        finally:
            fast.stop()
            slow.stop()

        j = journal_figures(work, args.journal_entries, args.journal_writers, args.legacy_entries)
        new, old = j["new"], j["old"]
        rows.append(
            (
                f"journal {args.journal_entries:,} entries",
                f"written in {j['build_s']:.0f} s, "
                f"{j['bytes'] / GIB:.2f} GiB in {new['segments']} segments",
            )
        )
        rows.append(
            (
                "  open (+1 hit, 1 miss)",
                f"{new['open_s']:.3f} s, peak RSS "
                f"{new['rss_gib']:.2f} GiB, {new['lookup_us']:.0f} µs per lookup",
            )
        )
        rows.append(
            (
                f"  JSON lines, {args.legacy_entries:,} entries",
                f"parse into a dict: {old['open_s']:.1f} s, peak RSS {old['rss_gib']:.2f} GiB",
            )
        )
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    width = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{width}}  {b}")
    print(
        f"summary: docs={args.docs} calls={n_calls} driver_peak_gib={driver_peak / GIB:.2f} "
        f"worker_peak_gib={worker_peak / GIB:.2f} cpu_ms_per_call={cpu_ms:.2f} "
        f"journal_open_s={new['open_s']:.3f} resume_s={resume_s:.1f} "
        f"utilization={utilization:.3f}"
    )


if __name__ == "__main__":
    main()
