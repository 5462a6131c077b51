"""What a run directory holds: per-stage progress, counters, and whether the run is complete.

``run_status(run_dir)`` returns plain data; ``rankmill status`` prints it.
"""

from __future__ import annotations

import json
from typing import Any

from rankmill.errors import ManifestError
from rankmill.manifest import Counters, RunDir

_MODEL_FIELDS = ("calls", "prompt_tokens", "completion_tokens", "cost_usd")


def run_status(run_dir: str) -> dict[str, Any]:
    rd = RunDir(run_dir)
    pipeline = rd.read_pipeline()
    if pipeline is None:
        raise ManifestError(f"{run_dir} is not a rankmill run directory (no pipeline.json)")
    fps = pipeline.get("fingerprints", {})
    stages = []
    complete = True
    for name in pipeline["stages"]:
        plan, recs = rd.stage_status(name)
        total = Counters()
        committed = 0
        for r in recs:
            if r is not None:
                committed += 1
                total.add(r.counters)
        last = rd.read_text(rd.path("stages", name, "last_run.json"))
        wall = json.loads(last)["wall_seconds"] if last else 0.0
        if plan is None:
            state = "not run"
        elif plan.fingerprint != fps.get(name):
            state = "stale"
        elif committed == len(plan.units):
            state = "complete"
        else:
            state = "partial"
        complete = complete and state == "complete"
        models: dict[str, dict[str, float]] = {}
        other: dict[str, float] = {}
        for key, value in total.extra.items():
            # the gateway keeps per-model accounting in extra as "<field>:<model>"
            fld, sep, model = key.partition(":")
            if sep and fld in _MODEL_FIELDS:
                models.setdefault(model, {})[fld] = value
            else:
                other[key] = value
        stages.append(
            {
                "stage": name,
                "state": state,
                "units_total": len(plan.units) if plan else 0,
                "units_committed": committed,
                "rows_in": total.rows_in,
                "rows_out": total.rows_out,
                "rejects": total.rejects,
                "llm_calls": total.llm_calls,
                "llm_cached": total.llm_cached,
                "prompt_tokens": total.prompt_tokens,
                "completion_tokens": total.completion_tokens,
                "cost_usd": total.cost_usd,
                "unit_seconds": total.seconds,
                "wall_seconds": wall,
                "models": models,
                "extra": other,
            }
        )
    return {
        "run_name": pipeline.get("run", {}).get("name", ""),
        "complete": complete,
        "stages": stages,
    }
