"""Benchmark: adaptive stopping vs asking every judge every sample (full voting).

    python benchmarks/judges.py --simulated-only            # seeds 1 2 3
    python benchmarks/judges.py --simulated-only --seeds 1 --confidences 0.95

Simulation (labelled as such): judges of known sensitivity and specificity label cranfield
pairs, the judged-relevant ones (1) and three unjudged documents per relevant one (0), as
among mined candidates. The ensemble asks, cheapest first, a bi-encoder-like model judge
(1 vote, no LLM call), then three LLM judges with 3 samples each (a small, a medium and a large
model). Full voting asks everything; adaptive voting fits Dawid–Skene on a calibration slice
that every judge labels fully (and each judge's sample consistency), then asks the other pairs
round by round, cheapest judge first, and stops each pair once its outcome is settled or the
remaining votes would leave its label unchanged with the given confidence. Both are
aggregated with Dawid–Skene over all their votes, and compared on the same drawn answers: LLM
calls per pair, calls saved, label agreement with full voting, and accuracy against the
simulated truth of each. (Agreement has a floor set by Dawid–Skene itself: a vote pattern
whose posterior is within a hair of one half, such as three weaker judges for and the strongest
against, lands on either side depending on the fitted accuracies, so two fits on different vote
sets can split a few per cent of pairs even where every vote was asked.)

Last line: ``summary: calls_saved=… agreement=… ds_accuracy_error=… acc_best_single=…
acc_ensemble=… acc_full=…`` (simulation, at the stage's default confidence, mean over seeds;
``ds_accuracy_error`` is the largest gap between a judge's Dawid–Skene accuracy estimate and its
true accuracy).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE.parent))  # tests.fixtures
os.environ.setdefault("HF_HUB_OFFLINE", "1")

JUDGES = [
    # name, sensitivity, specificity, samples, consistency, llm
    ("bi_encoder", 0.72, 0.72, 1, 1.0, False),
    ("small", 0.80, 0.78, 3, 0.80, True),
    ("medium", 0.86, 0.85, 3, 0.90, True),
    ("large", 0.93, 0.92, 3, 0.95, True),
]


def cranfield_truth(seed: int) -> dict[str, int]:
    import numpy as np

    from rankmill.ensemble import task_id
    from tests.fixtures.judged import load

    coll = load("cranfield")
    rng = np.random.default_rng(seed)
    truth: dict[str, int] = {}
    for q in sorted(coll.relevant):
        pos = sorted(coll.relevant[q])
        for d in pos:
            truth[task_id(q, d)] = 1
        seen = set(pos) | coll.excluded.get(q, set())
        picks = [d for d in rng.choice(coll.doc_ids, size=4 * len(pos) + 8, replace=False)]
        for d in [d for d in picks if d not in seen][: 3 * len(pos)]:
            truth[task_id(q, str(d))] = 0
    return truth


def simulate(seed: int, confidences: list[float], calibration: int) -> list[dict]:
    import numpy as np
    import pandas as pd

    from rankmill.ensemble import (
        JudgeModel,
        SimulatedJudge,
        StopRule,
        accuracy_against,
        aggregate,
        ask_adaptively,
        votes_of,
    )

    truth = cranfield_truth(seed)
    t = pd.Series(truth)
    judges = [SimulatedJudge(n, se, sp, k, c, llm) for n, se, sp, k, c, llm in JUDGES]
    specs = [j.spec() for j in judges]
    answers = simulate_answers_cached(truth, judges, seed)
    tasks = sorted(truth)
    llm_full = sum(j.samples for j in judges if j.llm)

    def answer(calls):
        return [answers[c] for c in calls]

    full, _ = ask_adaptively(tasks, specs, answer, StopRule(full=True))
    full_votes = votes_of(full)
    full_ds = aggregate(full_votes, "dawid_skene")
    full_labels = full_ds.pairs["label"].astype(int)
    acc_full = float((full_labels == t.loc[full_labels.index]).mean())
    acc_mv = float(
        (
            aggregate(full_votes, "majority_vote").pairs["label"].astype(int)
            == t.loc[full_labels.index]
        ).mean()
    )
    true_acc = accuracy_against(full_votes, truth)
    ds_err = float((full_ds.judges["accuracy"] - true_acc).abs().max())
    rng = np.random.default_rng(seed)
    cal = set(rng.choice(tasks, size=calibration, replace=False).tolist())
    cal_votes = [v for v in full_votes if v["task"] in cal]
    model = JudgeModel.from_aggregate(aggregate(cal_votes, "dawid_skene"), votes=cal_votes)
    rest = [x for x in tasks if x not in cal]
    rows = [
        {
            "seed": seed,
            "mode": "full",
            "confidence": None,
            "pairs": len(tasks),
            "llm_calls_per_pair": float(llm_full),
            "calls_saved": 0.0,
            "agreement": 1.0,
            "accuracy": acc_full,
            "acc_majority": acc_mv,
            "acc_best_single": float(true_acc.max()),
            "ds_accuracy_error": ds_err,
        }
    ]
    for conf in confidences:
        t0 = time.perf_counter()
        states, _ = ask_adaptively(rest, specs, answer, StopRule(confidence=conf), model)
        calls = sum(s.llm_calls() for s in states.values()) + llm_full * len(cal)
        labels = aggregate(votes_of(states) + cal_votes, "dawid_skene").pairs["label"].astype(int)
        rows.append(
            {
                "seed": seed,
                "mode": "adaptive",
                "confidence": conf,
                "pairs": len(tasks),
                "llm_calls_per_pair": calls / len(tasks),
                "calls_saved": 1.0 - calls / (llm_full * len(tasks)),
                "agreement": float((labels == full_labels.loc[labels.index]).mean()),
                "accuracy": float((labels == t.loc[labels.index]).mean()),
                "acc_majority": acc_mv,
                "acc_best_single": float(true_acc.max()),
                "ds_accuracy_error": ds_err,
                "seconds": time.perf_counter() - t0,
            }
        )
    return rows


def simulate_answers_cached(truth, judges, seed):
    from rankmill.ensemble import simulate_answers

    return simulate_answers(truth, judges, seed=1000 + seed)


def real(queries: int, calibration: int, run_dir: str) -> dict:
    """The judge stage on a slice of cranfield: ingest (one positive per query, as a synthetic
    query knows), mine, then judges (MiniLM, and SmolLM2 under two prompts and two seeds)."""
    import json
    import tempfile

    import numpy as np

    from rankmill.ensemble import aggregate, judge_votes, task_id
    from rankmill.manifest import RunDir
    from rankmill.pipeline import validate_pipeline
    from rankmill.runner import Runner
    from tests.fixtures.judged import DATA, load, one_positive

    coll = load("cranfield")
    pos = one_positive(coll, seed=0)
    qids = sorted(pos, key=lambda x: int(x) if x.isdigit() else x)[:queries]
    src = Path(tempfile.mkdtemp(prefix="judges-bench-"))
    (src / "qrels").mkdir()
    os.symlink(DATA / "cranfield" / "corpus.jsonl", src / "corpus.jsonl")
    with open(src / "queries.jsonl", "w") as f:
        for q in qids:
            f.write(json.dumps({"_id": q, "text": coll.queries[q]}) + "\n")
    with open(src / "qrels" / "test.tsv", "w") as f:
        f.write("query-id\tcorpus-id\tscore\n")
        for q in qids:
            f.write(f"{q}\t{pos[q]}\t1\n")
    llm = {"endpoint": "local", "temperature": 0.7}
    raw = {
        "run": {"name": "judges-bench", "seed": 13},
        "endpoints": {"local": {"local": True, "model": "smollm2-135m", "n_ctx": 2048,
                                "max_concurrency": 4, "timeout_s": 300}},
        "stages": {
            "ingest": {"source": str(src)},
            "mine": {"num_negatives": 4},
            "judge": {
                "calibration_pairs": calibration,
                "doc_max_chars": 600,
                "rows_per_unit": 32,
                "judges": [
                    {"name": "minilm", "kind": "bi_encoder", "threshold": 0.5},
                    {"name": "smollm", "samples": 3, **llm},
                    {"name": "smollm_strict", "prompt": "judge_strict", **llm},
                    {"name": "smollm_seed", "seed": 1, **llm},
                ],
            },
        },
    }  # fmt: skip
    t0 = time.perf_counter()
    Runner(validate_pipeline(raw), run_dir).run()
    seconds = time.perf_counter() - t0
    rd = RunDir(run_dir)
    votes = rd.read_table("judge", "votes").to_pylist()
    judgments = rd.read_table("judge", "judgments").to_pylist()
    truth = {
        task_id(j["query_id"], j["doc_id"]): int(
            j["doc_id"] in coll.relevant.get(j["query_id"], ())
        )
        for j in judgments
    }
    data = [
        {"task": task_id(v["query_id"], v["doc_id"]), "judge": v["judge"],
         "verdict": v["verdict"]}
        for v in votes
    ]  # fmt: skip
    jv = judge_votes(data)
    acc = {
        j: float(
            np.mean([int(lab) == truth[t] for t, lab in zip(g["task"], g["label"], strict=True)])
        )
        for j, g in jv.groupby("worker")
    }
    mv = aggregate(data, "majority_vote").pairs["label"]
    acc_mv = float(np.mean([int(mv[t]) == truth[t] for t in mv.index if mv[t] is not None]))
    labelled = [j for j in judgments if j["label"] is not None]
    acc_ds = float(np.mean([int(j["label"]) == truth[task_id(j["query_id"], j["doc_id"])]
                            for j in labelled]))  # fmt: skip
    full_per_pair = 3 + 1 + 1  # LLM calls per pair when every judge is asked every sample
    llm_calls = sum(1 for v in votes if v["kind"] == "llm")
    before = rd.read_table("mine", "negatives").to_pylist()
    after = rd.read_table("judge", "negatives").to_pylist()

    def fn(rows: list) -> tuple[int, int]:
        n = sum(len(r["negative_ids"]) for r in rows)
        f = sum(
            1 for r in rows for d in r["negative_ids"] if d in coll.relevant.get(r["query_id"], ())
        )
        return n, f

    nb, fb = fn(before)
    na, fa = fn(after)
    return {
        "pairs": len(judgments),
        "seconds": seconds,
        "acc": acc,
        "acc_majority": acc_mv,
        "acc_ds": acc_ds,
        "llm_calls_per_pair": llm_calls / max(1, len(judgments)),
        "calls_saved": 1.0 - llm_calls / max(1, full_per_pair * len(judgments)),
        "full_per_pair": full_per_pair,
        "fn_before": fb / max(1, nb),
        "fn_after": fa / max(1, na),
        "negatives_kept": na / max(1, nb),
        "negatives_before": nb,
        "report": rd.read_table("judge", "judge_report").to_pylist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--simulated-only", action="store_true", help="run the simulation alone")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--confidences", type=float, nargs="+", default=[0.95, 0.98, 0.99, 0.995])
    ap.add_argument("--calibration", type=int, default=300, help="pairs in the calibration slice")
    ap.add_argument("--queries", type=int, default=16, help="real part: cranfield queries")
    ap.add_argument("--real-calibration", type=int, default=24, help="real part: calibration")
    ap.add_argument("--run-dir", default=None, help="real part: run directory (default: tmp)")
    args = ap.parse_args()

    import pandas as pd

    rows = []
    for seed in args.seeds:
        rows += simulate(seed, args.confidences, args.calibration)
    df = pd.DataFrame(rows)
    print("simulation: cranfield pairs, simulated judges " + ", ".join(j[0] for j in JUDGES))
    cols = ["mode", "confidence", "llm_calls_per_pair", "calls_saved", "agreement", "accuracy"]
    table = df.groupby(["mode", "confidence"], dropna=False)[cols[2:]].mean().reset_index()
    print(table.to_string(index=False, float_format=lambda x: f"{x:.3f}"))
    print(
        f"accuracy of majority vote {df['acc_majority'].mean():.3f}, best single judge "
        f"{df['acc_best_single'].mean():.3f}; Dawid-Skene accuracy estimates off by at most "
        f"{df['ds_accuracy_error'].max():.3f}"
    )
    r = None
    if not args.simulated_only:
        import tempfile

        run_dir = args.run_dir or tempfile.mkdtemp(prefix="judges-run-")
        r = real(args.queries, args.real_calibration, run_dir)
        print(
            f"\nreal: judge stage on {r['pairs']} mined pairs of {args.queries} cranfield queries "
            f"({r['seconds']:.0f} s); accuracy against cranfield's judgments:"
        )
        for j, a in sorted(r["acc"].items()):
            print(f"  {j:<14} {a:.3f}")
        print(f"  {'majority':<14} {r['acc_majority']:.3f}")
        print(f"  {'dawid_skene':<14} {r['acc_ds']:.3f}")
        for row in r["report"]:
            print(
                f"  {row['judge']}: estimated accuracy {row['accuracy']:.3f}, sensitivity "
                f"{row['sensitivity'] or 0:.2f}, specificity {row['specificity'] or 0:.2f}; "
                f"{'; '.join(row['warnings']) or 'no warning'}"
            )
        print(
            f"  LLM calls per pair {r['llm_calls_per_pair']:.2f} (full voting "
            f"{r['full_per_pair']}), saved "
            f"{r['calls_saved']:.3f}; false negatives among {r['negatives_before']} mined "
            f"negatives {r['fn_before']:.3f} before relabeling, {r['fn_after']:.3f} after, "
            f"{r['negatives_kept']:.3f} of negatives kept"
        )
    from rankmill.ensemble import StopRule

    default = df[(df["mode"] == "adaptive") & (df["confidence"] == StopRule().confidence)]
    full = df[df["mode"] == "full"]
    if default.empty:
        default = df[df["mode"] == "adaptive"]
    print(
        f"summary: calls_saved={default['calls_saved'].mean():.3f} "
        f"agreement={default['agreement'].mean():.4f} "
        f"ds_accuracy_error={df['ds_accuracy_error'].max():.3f} "
        f"acc_best_single={df['acc_best_single'].mean():.3f} "
        f"acc_ensemble={default['accuracy'].mean():.3f} acc_full={full['accuracy'].mean():.3f}"
        + (
            ""
            if r is None
            else f" real_calls_saved={r['calls_saved']:.3f} real_acc_best_single="
            f"{max(r['acc'].values()):.3f} real_acc_ensemble={r['acc_ds']:.3f} "
            f"fn_before={r['fn_before']:.3f} fn_after={r['fn_after']:.3f} "
            f"negatives_kept={r['negatives_kept']:.3f}"
        )
    )


if __name__ == "__main__":
    main()
