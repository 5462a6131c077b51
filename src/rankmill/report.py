"""The run report: one self-contained HTML page with what happened to the data.

``rankmill report RUN_DIR`` writes ``RUN_DIR/report.html`` (or ``--out``). The page carries
plotly.js inline, so it opens offline and makes no network request. Its figures:

- ``rows``: rows in and out of each stage; ``rejects``: rejected rows by stage and reason;
- ``labels``: LLM verdicts and the P(yes) / soft-label distribution;
- ``judges``: agreement between judges (Cohen's kappa, a heatmap) and each judge's accuracy
  against the given judgments (qrels), when the run has them;
- ``margins``: positive-minus-negative score margins of the mined negatives, and
  ``ranks``: the ranks the negatives were mined at;
- ``cost``: LLM calls and cost by stage.

:func:`run_summary` gathers the numbers (plain dicts and lists), :func:`render_html` draws
them, and :func:`summary_markdown` writes the same figures as tables for the dataset card.
"""

from __future__ import annotations

import html
import json
from collections import Counter, defaultdict
from itertools import combinations
from typing import Any

import pyarrow as pa

from rankmill.manifest import RunDir

PLOTS = ("rows", "rejects", "labels", "judges", "margins", "ranks", "cost")


def _table_of(rd: RunDir, stages: list[str], table: str) -> tuple[str, pa.Table] | None:
    """The last stage (in pipeline order) that committed ``table``, and the table."""
    for stage in reversed(stages):
        plan = rd.read_plan(stage)
        if plan is None or table not in plan.outputs:
            continue
        try:
            return stage, rd.read_table(stage, table)
        except Exception:  # an incomplete stage has nothing to report yet
            continue
    return None


def _hist(values: list[float], bins: int = 10, lo: float = 0.0, hi: float = 1.0) -> list[int]:
    counts = [0] * bins
    for v in values:
        if v is None:
            continue
        i = int((v - lo) / (hi - lo) * bins) if hi > lo else 0
        counts[min(max(i, 0), bins - 1)] += 1
    return counts


def run_summary(run_dir: str) -> dict[str, Any]:
    """Every number the report and the dataset card show."""
    from rankmill.status import run_status

    rd = RunDir(run_dir)
    status = run_status(run_dir)
    stages = [s["stage"] for s in status["stages"]]
    out: dict[str, Any] = {
        "run_name": status.get("run_name", ""),
        "stages": [
            {
                "stage": s["stage"],
                "state": s["state"],
                "rows_in": s["rows_in"],
                "rows_out": s["rows_out"],
                "rejected": sum(s["rejects"].values()),
                "llm_calls": s["llm_calls"],
                "llm_cached": s.get("llm_cached", 0),
                "cost_usd": round(s["cost_usd"], 6),
            }
            for s in status["stages"]
        ],
        "rejects": [
            {"stage": s["stage"], "reason": r, "count": n}
            for s in status["stages"]
            for r, n in sorted(s["rejects"].items(), key=lambda kv: -kv[1])
        ],
    }

    labels = _table_of(rd, stages, "labels")
    if labels is not None and labels[1].num_rows:
        t = labels[1]
        verdicts = t.column("verdict").to_pylist()
        p = [x for x in t.column("p_yes").to_pylist() if x is not None]
        out["labels"] = {
            "stage": labels[0],
            "answers": t.num_rows,
            "yes": sum(1 for v in verdicts if v),
            "no": sum(1 for v in verdicts if not v),
            "p_yes_hist": _hist(p),
            "p_yes_mean": round(sum(p) / len(p), 4) if p else None,
        }
        out["judges"] = _judges(t)
    judgments = _table_of(rd, stages, "judgments")
    if judgments is not None:
        col = next((c for c in ("posterior", "soft_label") if c in judgments[1].column_names), None)
        if col:
            soft = [x for x in judgments[1].column(col).to_pylist() if x is not None]
            out.setdefault("labels", {})["soft_label_hist"] = _hist(soft)
    # the judge stage's own fitted accuracies and agreement replace what labels alone show
    report = _table_of(rd, stages, "judge_report")
    agreement = _table_of(rd, stages, "agreement")
    if report is not None and report[1].num_rows:
        out["judges"] = _judge_stage(report[1], agreement[1] if agreement else None)

    negatives = _table_of(rd, stages, "negatives")
    if negatives is not None and negatives[1].num_rows:
        margins: list[float] = []
        ranks: list[int] = []
        kind = None
        for row in negatives[1].to_pylist():
            kind = row.get("score_kind") or kind
            pos = [s for s in row.get("positive_scores") or [] if s is not None]
            for s in row.get("negative_scores") or []:
                if pos and s is not None:
                    margins.append(max(pos) - s)
            ranks += [r for r in row.get("negative_ranks") or [] if r is not None]
        out["negatives"] = {
            "stage": negatives[0],
            "queries": negatives[1].num_rows,
            "negatives": sum(len(r or []) for r in negatives[1].column("negative_ids").to_pylist()),
            "score_kind": kind,
            "margins": margins,
            "ranks": ranks,
        }
    return out


def _judges(labels: pa.Table) -> dict[str, Any]:
    """Agreement between judges (Cohen's kappa on pairs both judged, by majority verdict over
    samples) and each judge's accuracy against the pair's given judgment, where it has one."""
    from sklearn.metrics import cohen_kappa_score

    votes: dict[str, dict[tuple[str, str], list[bool]]] = defaultdict(lambda: defaultdict(list))
    truth: dict[tuple[str, str], bool] = {}
    cols = labels.column_names
    judge_col = labels.column("judge").to_pylist() if "judge" in cols else None
    qrel = labels.column("qrel_score").to_pylist() if "qrel_score" in cols else None
    for i, (q, d, v) in enumerate(
        zip(
            labels.column("query_id").to_pylist(),
            labels.column("doc_id").to_pylist(),
            labels.column("verdict").to_pylist(),
            strict=True,
        )
    ):
        judge = (judge_col[i] if judge_col else None) or "label"
        votes[judge][(q, d)].append(bool(v))
        if qrel is not None and qrel[i] is not None:
            truth[(q, d)] = qrel[i] > 0
    majority = {j: {k: sum(v) * 2 > len(v) for k, v in pairs.items()} for j, pairs in votes.items()}
    names = sorted(majority)
    kappa = [[1.0 if a == b else None for b in names] for a in names]
    for (ia, a), (ib, b) in combinations(enumerate(names), 2):
        shared = sorted(set(majority[a]) & set(majority[b]))
        if len(shared) >= 2:
            ya = [majority[a][k] for k in shared]
            yb = [majority[b][k] for k in shared]
            k = cohen_kappa_score(ya, yb) if len(set(ya) | set(yb)) > 1 else 1.0
            kappa[ia][ib] = kappa[ib][ia] = round(float(k), 4)
    accuracy = []
    for j in names:
        judged = [k for k in majority[j] if k in truth]
        if judged:
            hits = sum(majority[j][k] == truth[k] for k in judged)
            accuracy.append({"judge": j, "pairs": len(judged), "accuracy": hits / len(judged)})
    return {"names": names, "kappa": kappa, "accuracy": accuracy}


def _judge_stage(report: pa.Table, agreement: pa.Table | None) -> dict[str, Any]:
    rows = report.to_pylist()
    names = sorted({r["judge"] for r in rows})
    kappa: list[list[float | None]] = [[1.0 if a == b else None for b in names] for a in names]
    for r in agreement.to_pylist() if agreement is not None else []:
        a, b = r.get("judge_a"), r.get("judge_b")
        if a in names and b in names and r.get("kappa") is not None:
            kappa[names.index(a)][names.index(b)] = kappa[names.index(b)][names.index(a)] = round(
                float(r["kappa"]), 4
            )
    accuracy = [
        {"judge": r["judge"], "pairs": int(r.get("n") or 0), "accuracy": float(r["accuracy"])}
        for r in rows
        if r.get("accuracy") is not None
    ]
    return {"names": names, "kappa": kappa, "accuracy": accuracy, "source": "judge"}


# -- HTML ----------------------------------------------------------------------------------------
def _figures(summary: dict[str, Any]) -> dict[str, Any]:
    import plotly.graph_objects as go

    figs: dict[str, Any] = {}
    st = summary["stages"]
    names = [s["stage"] for s in st]
    f = go.Figure()
    f.add_bar(name="rows in", x=names, y=[s["rows_in"] for s in st])
    f.add_bar(name="rows out", x=names, y=[s["rows_out"] for s in st])
    f.add_bar(name="rejected", x=names, y=[s["rejected"] for s in st])
    f.update_layout(title="Rows through each stage", barmode="group", yaxis_type="log")
    figs["rows"] = f

    f = go.Figure()
    by_reason: dict[str, dict[str, int]] = defaultdict(dict)
    for r in summary["rejects"]:
        by_reason[r["reason"]][r["stage"]] = r["count"]
    for reason, per_stage in sorted(by_reason.items()):
        f.add_bar(name=reason, x=names, y=[per_stage.get(n, 0) for n in names])
    if not by_reason:
        f.add_bar(name="rejected", x=names, y=[0] * len(names))
        f.add_annotation(
            text="no row was rejected", xref="paper", yref="paper", x=0.5, y=0.5, showarrow=False
        )
    f.update_layout(title="Rejected rows by reason", barmode="stack")
    figs["rejects"] = f

    lab = summary.get("labels")
    f = go.Figure()
    centers = [round(0.05 + i / 10, 2) for i in range(10)]
    if lab and "p_yes_hist" in lab:
        f.add_bar(name="P(yes)", x=centers, y=lab["p_yes_hist"])
    if lab and "soft_label_hist" in lab:
        f.add_bar(name="soft label", x=centers, y=lab["soft_label_hist"])
    if lab and "yes" in lab:
        f.add_annotation(
            text=f"verdicts: {lab['yes']} yes / {lab['no']} no",
            xref="paper",
            yref="paper",
            x=0.5,
            y=1.08,
            showarrow=False,
        )
    f.update_layout(title="Label and score distributions", xaxis_title="score", barmode="group")
    figs["labels"] = f

    judges = summary.get("judges")
    f = go.Figure()
    if judges:
        f.add_heatmap(
            z=judges["kappa"],
            x=judges["names"],
            y=judges["names"],
            zmin=-1,
            zmax=1,
            colorscale="RdBu",
            colorbar={"title": "kappa"},
        )
        acc = ", ".join(
            f"{a['judge']}: {a['accuracy']:.2f} on {a['pairs']}" for a in judges["accuracy"]
        )
        what = "estimated accuracy" if judges.get("source") == "judge" else "accuracy vs qrels"
        f.update_layout(
            title="Judge agreement (Cohen's kappa)" + (f" - {what}: {acc}" if acc else "")
        )
    else:
        f.update_layout(title="Judge agreement: no labels in this run")
    figs["judges"] = f

    neg = summary.get("negatives")
    f = go.Figure()
    if neg:
        f.add_histogram(x=neg["margins"], nbinsx=30, name="margin")
    f.update_layout(
        title="Hard negatives: best positive score minus negative score"
        + (f" ({neg['score_kind']})" if neg and neg.get("score_kind") else ""),
        xaxis_title="margin",
    )
    figs["margins"] = f
    f = go.Figure()
    if neg:
        f.add_histogram(x=neg["ranks"], name="rank")
    f.update_layout(title="Hard negatives: rank they were mined at", xaxis_title="rank")
    figs["ranks"] = f

    f = go.Figure()
    f.add_bar(name="LLM calls", x=names, y=[s["llm_calls"] for s in st])
    f.add_bar(name="cost (USD)", x=names, y=[s["cost_usd"] for s in st], yaxis="y2")
    f.update_layout(
        title="LLM calls and cost by stage",
        barmode="group",
        yaxis={"title": "calls", "rangemode": "tozero"},
        yaxis2={"title": "USD", "overlaying": "y", "side": "right", "rangemode": "tozero"},
    )
    figs["cost"] = f
    for fig in figs.values():
        fig.update_layout(template="plotly_white", height=380, margin={"t": 60, "b": 40})
    return figs


def render_html(summary: dict[str, Any]) -> str:
    """The report page: plotly.js inline, one figure per name in :data:`PLOTS`."""
    from plotly.offline import get_plotlyjs

    figs = _figures(summary)
    parts = []
    for name in PLOTS:
        div = figs[name].to_html(
            full_html=False,
            include_plotlyjs=False,
            div_id=f"plot-{name}",
            config={"displaylogo": False, "responsive": True},
        )
        parts.append(f'<section class="plot" data-plot="{name}">{div}</section>')
    title = html.escape(f"rankmill report: {summary.get('run_name') or 'run'}")
    table = summary_markdown(summary)
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{title}</title>"
        "<style>body{font-family:sans-serif;margin:1.5em;max-width:1200px}"
        "section.plot{margin-bottom:1em}pre{background:#f6f6f6;padding:1em;overflow:auto}</style>"
        f"<script type='text/javascript'>{get_plotlyjs()}</script>"
        f"</head><body><h1>{title}</h1>"
        + "".join(parts)
        + f"<h2>Summary</h2><pre>{html.escape(table)}</pre>"
        + f"<script type='application/json' id='summary'>{_json_for_html(summary)}</script>"
        "</body></html>\n"
    )


def _json_for_html(obj: Any) -> str:
    return json.dumps(obj, default=str).replace("</", "<\\/")


def write_report(run_dir: str, out: str | None = None) -> str:
    """Write the report of ``run_dir`` (default ``<run_dir>/report.html``); its path."""
    rd = RunDir(run_dir)
    page = render_html(run_summary(run_dir)).encode()
    path = out or rd.path("report.html")
    if out:
        with open(out, "wb") as f:
            f.write(page)
    else:
        rd.write_atomic(path, page)
    return path


# -- the same figures as tables ------------------------------------------------------------------
def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _quantiles(values: list[float]) -> str:
    if not values:
        return "-"
    v = sorted(values)

    def q(p: float) -> float:
        return v[min(len(v) - 1, int(p * (len(v) - 1) + 0.5))]

    return (
        f"min {v[0]:.3f} · p25 {q(0.25):.3f} · median {q(0.5):.3f} · "
        f"p75 {q(0.75):.3f} · max {v[-1]:.3f}"
    )


def summary_markdown(summary: dict[str, Any]) -> str:
    """The report's figures as Markdown tables (for the dataset card)."""
    out = ["### Rows, rejects, LLM calls and cost by stage", ""]
    out.append(
        _md_table(
            ["stage", "rows in", "rows out", "rejected", "LLM calls", "cached", "cost (USD)"],
            [
                [
                    s["stage"],
                    s["rows_in"],
                    s["rows_out"],
                    s["rejected"],
                    s["llm_calls"],
                    s["llm_cached"],
                    f"{s['cost_usd']:.4f}",
                ]
                for s in summary["stages"]
            ],
        )
    )
    if summary["rejects"]:
        out += ["", "### Rejected rows by reason", ""]
        out.append(
            _md_table(
                ["stage", "reason", "rows"],
                [[r["stage"], r["reason"], r["count"]] for r in summary["rejects"]],
            )
        )
    lab = summary.get("labels")
    if lab and "answers" in lab:
        out += ["", "### Labels", ""]
        rows = [
            ["answers", lab["answers"]],
            ["yes / no", f"{lab['yes']} / {lab['no']}"],
            ["mean P(yes)", lab["p_yes_mean"]],
            ["P(yes) histogram (10 bins, 0-1)", " ".join(map(str, lab["p_yes_hist"]))],
        ]
        if "soft_label_hist" in lab:
            rows.append(["soft label histogram", " ".join(map(str, lab["soft_label_hist"]))])
        out.append(_md_table(["", "value"], rows))
    judges = summary.get("judges")
    if judges and judges["accuracy"]:
        out += ["", "### Judges", ""]
        out.append(
            _md_table(
                [
                    "judge",
                    "pairs",
                    "accuracy (estimated)" if judges.get("source") else "accuracy vs qrels",
                ],
                [[a["judge"], a["pairs"], f"{a['accuracy']:.3f}"] for a in judges["accuracy"]],
            )
        )
    if judges and len(judges["names"]) > 1:
        out += ["", "Agreement (Cohen's kappa):", ""]
        out.append(
            _md_table(
                ["", *judges["names"]],
                [[a, *judges["kappa"][i]] for i, a in enumerate(judges["names"])],
            )
        )
    neg = summary.get("negatives")
    if neg:
        out += ["", "### Hard negatives", ""]
        out.append(
            _md_table(
                ["", "value"],
                [
                    ["queries", neg["queries"]],
                    ["negatives", neg["negatives"]],
                    ["score", neg["score_kind"]],
                    ["margin (best positive - negative)", _quantiles(neg["margins"])],
                    ["mined rank", _quantiles([float(r) for r in neg["ranks"]])],
                ],
            )
        )
    return "\n".join(out) + "\n"


def rejects_by_reason(summary: dict[str, Any]) -> dict[str, int]:
    c: Counter[str] = Counter()
    for r in summary["rejects"]:
        c[r["reason"]] += r["count"]
    return dict(c)
