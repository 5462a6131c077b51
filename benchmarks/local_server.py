"""Calls/s of the quickstart's label stage: llama.cpp's llama-server with parallel slots (what a
``local: true`` endpoint starts) against llama-cpp-python's server, one request at a time
(what it started before), on the same model, threads, stage and calls.

Claim: the quickstart's label stage answers at least 3x the calls/s of llama-cpp-python's
server, with the same share of valid (parseable JSON) verdicts. Also reported: how often the
two servers give the same verdict, and whether a second llama-server run with the same seeds
(fresh journal) gives identical answers (P(yes) within 1e-6).

Ingest and mine run once; each variant then runs ``--only label`` on a copy of that run dir,
so every variant makes the same calls with a cold journal. The calls/s figure is the stage's
LLM calls over its wall time (``stages/label/last_run.json``: server start, Ray workers and
all calls), the figure ``rankmill status`` shows.

    python benchmarks/local_server.py [--slots 4] [--no-baseline]

The baseline needs llama-cpp-python's server (``pip install 'llama-cpp-python[server]'``,
which compiles llama.cpp); without it, or with ``--no-baseline``, only llama-server runs.
Last line: ``summary: calls=… baseline_calls_per_s=… calls_per_s=… speedup=…
valid_baseline=… valid=… verdict_agreement=… rerun_identical=…``.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from rankmill.llm import local  # noqa: E402
from rankmill.manifest import RunDir  # noqa: E402

PIPELINE = str(REPO / "pipelines" / "quickstart.yaml")


def rankmill(args: list[str]) -> None:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", HF_HUB_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO / "src"), os.environ.get("PYTHONPATH", "")) if p
    )
    cmd = [sys.executable, "-m", "rankmill.cli", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}")


@contextlib.contextmanager
def llama_cpp_python_server(threads: int) -> Any:
    """llama-cpp-python's server as rankmill started it before: one request at a time."""
    port = local.free_port()
    log = tempfile.NamedTemporaryFile(prefix="llama-cpp-python-", suffix=".log", delete=False)
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", local.default_model_path(), "--model_alias", "smollm2-135m",
        "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048",
        "--n_threads", str(threads), "--logits_all", "true",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 300
        while local._models_answer(base_url) is None:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"llama-cpp-python's server did not start; see {log.name}")
            time.sleep(0.5)
        yield base_url
    finally:
        proc.terminate()
        proc.wait(30)


def label_run(base: Path, dest: Path, overrides: list[str]) -> dict[str, Any]:
    shutil.copytree(base, dest)
    rankmill(["run", PIPELINE, "--run-dir", str(dest), "--only", "label", *overrides])
    last = json.loads((dest / "stages" / "label" / "last_run.json").read_text())
    rd = RunDir(str(dest))
    labels = rd.read_table("label", "labels").to_pylist()
    rejects = rd.read_table("label", "rejects").to_pylist()
    calls = len(labels) + len(rejects)
    return {
        "seconds": float(last["wall_seconds"]),
        "calls": calls,
        "labels": {(r["query_id"], r["doc_id"], r["sample_index"]): r for r in labels},
        "rejects": rejects,
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slots", type=int, default=None, help="default: the quickstart's")
    ap.add_argument("--no-baseline", action="store_true")
    args = ap.parse_args()
    threads = local.default_threads()
    have_baseline = importlib.util.find_spec("llama_cpp") is not None and not args.no_baseline
    local.check_installed()

    root = Path(tempfile.mkdtemp(prefix="rankmill-bench-local-"))
    base = root / "base"
    rankmill(["run", PIPELINE, "--run-dir", str(base), "--until", "mine"])

    slots = ["--set", f"endpoints.local.max_concurrency={args.slots}"] if args.slots else []
    results: dict[str, dict[str, Any]] = {}
    if have_baseline:
        with llama_cpp_python_server(threads) as url:
            results["llama-cpp-python, 1 at a time"] = label_run(
                base,
                root / "baseline",
                [
                    "--set", "endpoints.local.local=false",
                    "--set", f"endpoints.local.base_url={url}",
                    "--set", "endpoints.local.max_concurrency=1",
                ],
            )  # fmt: skip
    results["llama-server"] = label_run(base, root / "server", slots)
    results["llama-server, again"] = label_run(base, root / "server-again", slots)

    print(f"threads={threads} root={root}")
    print(f"{'variant':34} {'calls':>6} {'seconds':>8} {'calls/s':>8} {'valid':>6}")
    for name, r in results.items():
        valid = len(r["labels"]) / max(1, r["calls"])
        print(
            f"{name:34} {r['calls']:>6} {r['seconds']:>8.1f} "
            f"{r['calls'] / r['seconds']:>8.2f} {valid:>6.2f}"
        )
    new, again = results["llama-server"], results["llama-server, again"]
    same = [
        k
        for k, a in new["labels"].items()
        if k in again["labels"]
        and a["verdict"] == again["labels"][k]["verdict"]
        and abs((a["p_yes"] or 0.0) - (again["labels"][k]["p_yes"] or 0.0)) <= 1e-6
    ]
    rerun_identical = len(same) == len(new["labels"]) == len(again["labels"])
    cps = new["calls"] / new["seconds"]
    fields = {"calls": new["calls"]}
    if have_baseline:
        old = results["llama-cpp-python, 1 at a time"]
        old_cps = old["calls"] / old["seconds"]
        both = [k for k in new["labels"] if k in old["labels"]]
        agree = sum(new["labels"][k]["verdict"] == old["labels"][k]["verdict"] for k in both)
        fields |= {
            "baseline_calls_per_s": f"{old_cps:.2f}",
            "calls_per_s": f"{cps:.2f}",
            "speedup": f"{cps / old_cps:.2f}",
            "valid_baseline": f"{len(old['labels']) / max(1, old['calls']):.3f}",
        }
        verdict_agreement = f"{agree / max(1, len(both)):.3f}"
    else:
        fields["calls_per_s"] = f"{cps:.2f}"
        verdict_agreement = "n/a"
    fields |= {
        "valid": f"{len(new['labels']) / max(1, new['calls']):.3f}",
        "verdict_agreement": verdict_agreement,
        "rerun_identical": str(rerun_identical).lower(),
    }
    shutil.rmtree(root, ignore_errors=True)
    print("summary: " + " ".join(f"{k}={v}" for k, v in fields.items()))


if __name__ == "__main__":
    main()
