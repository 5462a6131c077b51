"""Benchmark: adaptive stopping vs asking every judge every sample (full voting).

    python benchmarks/judges.py --simulated-only            # seeds 1 2 3
    python benchmarks/judges.py --simulated-only --seeds 1 --confidences 0.95

Simulation (labelled as such): judges of known sensitivity and specificity label cranfield
pairs, the judged-relevant ones (1) and three unjudged documents per relevant one (0), as
among mined candidates. The ensemble asks, cheapest first, a bi-encoder-like model judge
(1 vote, no LLM call), then three LLM judges with 3 samples each (a small, a medium and a large
model). Full voting asks everything; adaptive voting fits Dawid–Skene on a calibration slice
that every judge labels fully, then stops each pair once its outcome is settled or its posterior
passes the confidence. Both are aggregated with Dawid–Skene over all their votes, and compared
on the same drawn answers: LLM calls per pair, calls saved, label agreement with full voting,
and accuracy against the simulated truth of each.

Last line: ``summary: calls_saved=… agreement=… ds_accuracy_error=… acc_best_single=…
acc_ensemble=… acc_full=…`` (simulation, at the default confidence 0.95, mean over seeds;
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
    from _judged import load

    from rankmill.ensemble import task_id

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
    model = JudgeModel.from_aggregate(aggregate(cal_votes, "dawid_skene"))
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--simulated-only", action="store_true", help="run the simulation alone")
    ap.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    ap.add_argument("--confidences", type=float, nargs="+", default=[0.9, 0.95, 0.99])
    ap.add_argument("--calibration", type=int, default=300, help="pairs in the calibration slice")
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
    if not args.simulated_only:
        print("real judges: run the judge stage (see the README); not part of this run")
    default = df[(df["mode"] == "adaptive") & (df["confidence"] == 0.95)]
    full = df[df["mode"] == "full"]
    if default.empty:
        default = df[df["mode"] == "adaptive"]
    print(
        f"summary: calls_saved={default['calls_saved'].mean():.3f} "
        f"agreement={default['agreement'].mean():.4f} "
        f"ds_accuracy_error={df['ds_accuracy_error'].max():.3f} "
        f"acc_best_single={df['acc_best_single'].mean():.3f} "
        f"acc_ensemble={default['accuracy'].mean():.3f} acc_full={full['accuracy'].mean():.3f}"
    )


if __name__ == "__main__":
    main()
