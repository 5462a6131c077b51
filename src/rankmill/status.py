"""What a run directory holds: per-stage progress, counters, and whether the run is complete.

``run_status(run_dir)`` returns plain data; ``rankmill status`` prints it. A stage is

- ``not run``: no plan;
- ``partial``: planned, some units or steps not committed;
- ``stale``: its plan was built for another fingerprint than the run's latest, or from
  upstream content that has changed since (an upstream stage was recomputed);
- ``complete``: every unit and step committed under the current fingerprint.

A stage whose rejects exceed ``reject_share`` (default 0.5) of its input rows is ``flagged``,
with its top reasons: a run that "completed" by rejecting everything is not a success.
``verify=True`` also checks every committed file against its record (sha256).

A judge stage's entry also has ``judge`` (:func:`judge_summary`): its votes, the LLM calls it
asked against full voting and the share adaptive stopping saved, agreement (mean per pair,
Fleiss' kappa, Krippendorff's alpha) and why its pairs stopped.

Exit codes of ``rankmill status`` (and ``rankmill run``), documented in the README:
"""

from __future__ import annotations

import json
from typing import Any

from rankmill.errors import ManifestError
from rankmill.manifest import Counters, RunDir

_MODEL_FIELDS = ("calls", "prompt_tokens", "completion_tokens", "cost_usd")

# Exit codes shared by `rankmill status` and `rankmill run`.
EXIT_OK = 0
EXIT_INCOMPLETE = 1  # status: a stage is not complete; run: a stage failed (units kept)
EXIT_USAGE = 2  # invalid config, options or input data
EXIT_CORRUPT = 3  # the run dir is unreadable or a committed file fails its checksum
EXIT_FLAGGED = 4  # --strict: a stage rejected more than its share of rows
EXIT_BUDGET = 5  # run: stopped at the run's budget (raise it and run again)
EXIT_LOCKED = 6  # run: another run holds the run dir
EXIT_INTERRUPTED = 130  # run: Ctrl-C / SIGTERM

__doc__ = (__doc__ or "") + "\n".join(
    f"    {code:>3}  {name}"
    for name, code in (
        ("complete / success", EXIT_OK),
        ("incomplete (status) or a stage failed (run)", EXIT_INCOMPLETE),
        ("invalid config, options or data", EXIT_USAGE),
        ("corrupt or unreadable run dir", EXIT_CORRUPT),
        ("a stage rejected more than its share (with --strict)", EXIT_FLAGGED),
        ("stopped at the budget", EXIT_BUDGET),
        ("the run dir is locked by another run", EXIT_LOCKED),
        ("interrupted", EXIT_INTERRUPTED),
    )
)


def run_status(run_dir: str, verify: bool = False, reject_share: float = 0.5) -> dict[str, Any]:
    rd = RunDir(run_dir)
    pipeline = rd.read_pipeline()
    if pipeline is None:
        raise ManifestError(f"{run_dir} is not a rankmill run directory (no pipeline.json)")
    fps = pipeline.get("fingerprints", {})
    stages = []
    complete = True
    corrupt: list[str] = []
    plans: dict[str, Any] = {}
    for name in pipeline["stages"]:
        plan = rd.read_plan(name)
        plans[name] = plan
        total = Counters()
        committed = 0
        steps_committed = 0
        if plan is not None:
            have = rd.committed_fps(name)
            have_steps = rd.committed_fps(name, step=True) if plan.steps else set()
            for _, fp in plan.units:
                if fp in have:
                    rec = rd.committed(name, fp)
                    if rec is None:
                        corrupt.append(f"{rd.record_path(name, fp)}: unreadable commit record")
                        continue
                    committed += 1
                    total.add(rec.counters)
            for _, fp in plan.steps:
                if fp in have_steps:
                    rec = rd.committed(name, fp, step=True)
                    if rec is not None:
                        steps_committed += 1
                        total.add(_step_counters(rec.counters))
        last = rd.read_text(rd.path("stages", name, "last_run.json"))
        try:
            wall = json.loads(last)["wall_seconds"] if last else 0.0
        except (ValueError, KeyError):
            wall = 0.0
        if plan is None:
            state = "not run"
        elif plan.fingerprint != fps.get(name) or _upstream_changed(rd, plan, plans):
            state = "stale"
        elif committed == len(plan.units) and steps_committed == len(plan.steps):
            state = "complete"
        else:
            state = "partial"
        complete = complete and state == "complete"
        if verify and plan is not None:
            corrupt.extend(rd.verify_stage(name))
        models: dict[str, dict[str, float]] = {}
        other: dict[str, float] = {}
        for key, value in total.extra.items():
            # the gateway keeps per-model accounting in extra as "<field>:<model>"
            fld, sep, model = key.partition(":")
            if sep and fld in _MODEL_FIELDS:
                models.setdefault(model, {})[fld] = value
            else:
                other[key] = value
        n_rejects = sum(total.rejects.values())
        share = n_rejects / total.rows_in if total.rows_in else 0.0
        flagged = n_rejects > 0 and share > reject_share
        top = sorted(total.rejects.items(), key=lambda kv: (-kv[1], kv[0]))[:3]
        stages.append(
            {
                "stage": name,
                "state": state,
                "units_total": len(plan.units) if plan else 0,
                "units_committed": committed,
                "steps_total": len(plan.steps) if plan else 0,
                "steps_committed": steps_committed,
                "rows_in": total.rows_in,
                "rows_out": total.rows_out,
                "rejects": total.rejects,
                "reject_share": round(share, 4),
                "flagged": flagged,
                "top_reasons": top,
                "llm_calls": total.llm_calls,
                "llm_cached": total.llm_cached,
                "prompt_tokens": total.prompt_tokens,
                "completion_tokens": total.completion_tokens,
                "cost_usd": total.cost_usd,
                "unit_seconds": total.seconds,
                "wall_seconds": wall,
                "models": models,
                "extra": other,
                "judge": judge_summary(other),
            }
        )
    return {
        "run_name": pipeline.get("run", {}).get("name", ""),
        "complete": complete,
        "flagged": [s["stage"] for s in stages if s["flagged"]],
        "corrupt": corrupt,
        "stages": stages,
    }


def judge_summary(extra: dict[str, float]) -> dict[str, Any] | None:
    """What a judge stage's counters say, or None for a stage that is not a judge: its votes,
    the LLM votes asked against full voting (every LLM judge, every sample, every pair), the
    calls adaptive stopping saved and their share, agreement (mean per pair, Fleiss' kappa,
    Krippendorff's alpha; None until the stage has aggregated) and why pairs stopped."""
    if "llm_calls_full" not in extra or "votes" not in extra:
        return None
    full = int(extra["llm_calls_full"])
    saved = int(extra.get("calls_saved", 0.0))
    stops = {k.partition(":")[2]: int(v) for k, v in sorted(extra.items()) if k.startswith("stop:")}
    return {
        "votes": int(extra["votes"]),
        "llm_calls": full - saved,
        "llm_calls_full": full,
        "calls_saved": saved,
        "calls_saved_share": round(saved / full, 4) if full else None,
        "mean_agreement": extra.get("mean_agreement"),
        "fleiss_kappa": extra.get("fleiss_kappa"),
        "krippendorff_alpha": extra.get("krippendorff_alpha"),
        "pairs": sum(stops.values()),
        "stops": stops,
        "bad_answers": int(extra.get("bad_answers", 0.0)),
    }


# The judge counters that judge_lines show (``stop:<why>`` too); status prints the rest as is.
JUDGE_KEYS = frozenset(
    {"votes", "llm_calls_full", "calls_saved", "calls_saved_share", "mean_agreement",
     "fleiss_kappa", "krippendorff_alpha", "bad_answers"}
)  # fmt: skip


def judge_lines(judge: dict[str, Any]) -> list[str]:
    """Two lines for a judge stage: votes and LLM calls asked against full voting; agreement
    and why pairs stopped."""
    share = judge["calls_saved_share"]
    saved = f"{judge['calls_saved']:,} saved" + (f", {share:.0%}" if share is not None else "")
    calls = (
        f"{judge['votes']:,} votes on {judge['pairs']:,} pairs; LLM calls "
        f"{judge['llm_calls']:,} of {judge['llm_calls_full']:,} for full voting ({saved})"
    )
    if judge["bad_answers"]:
        calls += f"; bad answers {judge['bad_answers']:,}"
    parts = [
        f"{name} {judge[key]:.2f}"
        for key, name in (
            ("mean_agreement", "agreement"),
            ("fleiss_kappa", "Fleiss' κ"),
            ("krippendorff_alpha", "Krippendorff's α"),
        )
        if judge[key] is not None
    ]
    agree = ", ".join(parts) or "agreement not aggregated yet"
    if judge["stops"]:
        agree += "; stopped: " + ", ".join(f"{k} {v:,}" for k, v in judge["stops"].items())
    return [calls, agree]


def _step_counters(c: Counters) -> Counters:
    # A step's rows are a summary of the units' rows, not more input: count its calls, cost
    # and extras, not its rows.
    return Counters(
        rejects=dict(c.rejects),
        llm_calls=c.llm_calls,
        llm_cached=c.llm_cached,
        prompt_tokens=c.prompt_tokens,
        completion_tokens=c.completion_tokens,
        cost_usd=c.cost_usd,
        seconds=c.seconds,
        extra=dict(c.extra),
    )


def _upstream_changed(rd: RunDir, plan: Any, plans: dict[str, Any]) -> bool:
    """Whether an upstream stage's committed content is no longer what this plan was built
    from."""
    for up, digest in (plan.upstream_digests or {}).items():
        up_plan = plans.get(up) or rd.read_plan(up)
        if up_plan is None:
            return True
        try:
            if rd.content_digest(up, up_plan) != digest:
                return True
        except ManifestError:
            return True
    return False


def reject_summary(stage: dict[str, Any]) -> str:
    """One line for a flagged stage: its share and its top reasons."""
    reasons = ", ".join(f"{r} {n:,}" for r, n in stage["top_reasons"])
    return (
        f"stage {stage['stage']!r} rejected {stage['reject_share']:.0%} of its "
        f"{stage['rows_in']:,} input rows (top reasons: {reasons})"
    )
