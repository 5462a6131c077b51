"""The ``rankmill`` command line: parse, call, print.

rankmill run PIPELINE.yaml --run-dir DIR [--until STAGE] [--only STAGE] [--set k=v ...]
rankmill status DIR [--verify] [--strict]
rankmill validate DATA [--format beir|jsonl|parquet|hf]
rankmill prompt NAME [--example] [--run DIR]
rankmill publish DIR --repo ORG/NAME [--private] [--create-pr]
rankmill report DIR [--out report.html]
rankmill journal compact DIR
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from rankmill.errors import (
    BudgetExceeded,
    ConfigError,
    CorruptData,
    DataError,
    ManifestError,
    RankmillError,
    RunDirLocked,
)
from rankmill.status import (
    EXIT_BUDGET,
    EXIT_CORRUPT,
    EXIT_FLAGGED,
    EXIT_INCOMPLETE,
    EXIT_INTERRUPTED,
    EXIT_LOCKED,
    EXIT_USAGE,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="rankmill: training-data synthesis for retrievers and rerankers.",
)
# Wide enough for the status table when output goes to a file or CI log.
# Text from files and errors is printed as it is: no emoji codes (":100:"), and messages are
# one line however narrow the terminal (soft_wrap), so logs and tests read them whole.
console = Console(stderr=False, width=None if sys.stdout.isatty() else 140, emoji=False)
err_console = Console(stderr=True, emoji=False, soft_wrap=True)


def _error(exc: Exception, code: int) -> typer.Exit:
    """Print a rankmill error for the user; the exit to raise with its code."""
    err_console.print(f"[red]error:[/red] {escape(str(exc))}")
    return typer.Exit(code)


def _exit_code(exc: RankmillError) -> int:
    """The documented exit code of an error (see rankmill.status)."""
    if isinstance(exc, BudgetExceeded):
        return EXIT_BUDGET
    if isinstance(exc, RunDirLocked):
        return EXIT_LOCKED
    if isinstance(exc, (CorruptData, ManifestError)):
        return EXIT_CORRUPT
    if isinstance(exc, (ConfigError, DataError)):
        return EXIT_USAGE
    return EXIT_INCOMPLETE


def _sigterm_as_interrupt(signum: int = 0, frame: Any = None) -> None:
    """SIGTERM (a job scheduler's stop, `kill`) unwinds like Ctrl-C: workers and local servers
    are stopped and the run lock released before the process ends."""
    raise KeyboardInterrupt


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command()
def run(
    pipeline: Path = typer.Argument(
        ..., help="Pipeline YAML file, e.g. pipelines/quickstart.yaml."
    ),
    run_dir: str = typer.Option(..., "--run-dir", "-o", help="Where outputs and records go."),
    until: str | None = typer.Option(None, help="Run stages up to and including this one."),
    only: str | None = typer.Option(None, help="Run this stage alone (its inputs must be done)."),
    set_: list[str] = typer.Option(
        [], "--set", help="Override a config value: --set stages.mine.num_negatives=8"
    ),
    ray_address: str | None = typer.Option(
        None, "--ray-address", help="Existing Ray cluster (default: RAY_ADDRESS, else local)."
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Log at INFO level."),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 4 when a stage rejected more than half of its input."
    ),
) -> None:
    """Run a pipeline; re-running resumes and skips every committed unit."""
    _setup_logging(verbose)
    signal.signal(signal.SIGTERM, _sigterm_as_interrupt)
    from rankmill.pipeline import load_pipeline
    from rankmill.runner import Runner
    from rankmill.status import reject_summary, run_status

    try:
        cfg = load_pipeline(pipeline, set_)
    except RankmillError as exc:
        raise _error(exc, EXIT_USAGE) from exc

    with Progress(
        TextColumn("{task.description:<12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
        disable=not console.is_terminal and os.environ.get("RANKMILL_PROGRESS") != "1",
    ) as progress:
        tasks: dict[str, Any] = {}

        def on_event(kind: str, **ev: Any) -> None:
            stage = ev.get("stage")
            if kind == "stage_skipped":
                console.print(f"[dim]{stage}: {ev['units']} unit(s) already committed, skipped[/]")
            elif kind == "stage_start":
                tasks[stage] = progress.add_task(
                    stage, total=ev["total"], completed=ev["done"], note=""
                )
                if ev["done"]:
                    progress.update(tasks[stage], note=f"{ev['done']} resumed")
            elif kind == "unit_done" and stage in tasks:
                progress.advance(tasks[stage])
            elif kind == "unit_done" and not ev["ok"]:
                msg = escape(f"{stage} unit {ev['unit_id']}: {ev.get('error', '')}")
                progress.console.print(f"[red]{msg}[/]")
            elif kind == "service_start":
                progress.console.print(f"[dim]starting local LLM server for {ev['name']} ...[/]")
            elif kind == "step_start":
                progress.console.print(f"[dim]{stage}: {ev['step']} ...[/]")
            elif kind == "corrupt":
                progress.console.print(f"[yellow]{escape(ev['detail'])}: recomputing it[/]")

        runner = Runner(cfg, run_dir, ray_address=ray_address, on_event=on_event)
        runner.sigterm_handler = _sigterm_as_interrupt
        try:
            result = runner.run(until=until, only=only)
        except BudgetExceeded as exc:
            err_console.print(f"[yellow]stopped:[/yellow] {escape(str(exc))}")
            raise typer.Exit(EXIT_BUDGET) from exc
        except RankmillError as exc:
            raise _error(exc, _exit_code(exc)) from exc
        except SystemExit as exc:
            # Ray's driver turns SIGTERM into SystemExit(15); the runner has unwound by now.
            if exc.code != signal.SIGTERM:
                raise
            err_console.print(
                "[yellow]interrupted:[/yellow] workers and local servers stopped; committed "
                "work is kept, run the same command again to resume"
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except KeyboardInterrupt:
            err_console.print(
                "[yellow]interrupted:[/yellow] workers and local servers stopped; committed "
                "work is kept, run the same command again to resume"
            )
            raise typer.Exit(EXIT_INTERRUPTED) from None
    replayed = (
        f" ({result.units_replayed} answered by the LLM journal, without workers)"
        if result.units_replayed
        else ""
    )
    console.print(
        f"done: {result.units_run} unit(s) run{replayed}, "
        f"{sum(s.units_skipped for s in result.stages)} skipped. "
        f"See: rankmill status {run_dir}"
    )
    try:
        st = run_status(run_dir)
    except RankmillError:
        return
    for s in st["stages"]:
        if s["flagged"]:
            err_console.print(f"[yellow]warning:[/yellow] {escape(reject_summary(s))}")
    if strict and st["flagged"]:
        raise typer.Exit(EXIT_FLAGGED)


def _fmt_int(n: float) -> str:
    return f"{int(n):,}"


@app.command()
def status(
    run_dir: str = typer.Argument(..., help="A run directory."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
    verify: bool = typer.Option(
        False, "--verify", help="Check every committed file against its record (sha256)."
    ),
    strict: bool = typer.Option(
        False, "--strict", help="Exit 4 when a stage rejected more than half of its input."
    ),
) -> None:
    """Show each stage's progress. Exit 0: complete; 1: incomplete; 3: corrupt or unreadable;
    4: (with --strict) a stage rejected more than half of its input."""
    from rankmill.status import JUDGE_KEYS, judge_lines, reject_summary, run_status

    try:
        st = run_status(run_dir, verify=verify)
    except RankmillError as exc:
        raise _error(exc, EXIT_CORRUPT) from exc
    if as_json:
        console.print_json(json.dumps(st))
    else:
        table = Table(title=escape(f"{st['run_name']} — {run_dir}"))
        for col in (
            "stage",
            "units",
            "rows in",
            "rows out",
            "rejects",
            "LLM calls",
            "tokens",
            "cost $",
            "time s",
            "state",
        ):
            table.add_column(col, justify="right" if col not in ("stage", "rejects") else "left")
        for s in st["stages"]:
            rejects = ", ".join(f"{k}: {v:,}" for k, v in sorted(s["rejects"].items())) or "-"
            calls = _fmt_int(s["llm_calls"])
            if s["llm_cached"]:
                calls += f" (+{_fmt_int(s['llm_cached'])} cached)"
            state = {
                "complete": "[green]complete[/]",
                "partial": "[yellow]partial[/]",
                "stale": "[yellow]stale[/]",
                "not run": "[dim]not run[/]",
            }[s["state"]]
            table.add_row(
                escape(s["stage"]),
                f"{s['units_committed']}/{s['units_total']}",
                _fmt_int(s["rows_in"]),
                _fmt_int(s["rows_out"]),
                escape(rejects),
                calls,
                f"{_fmt_int(s['prompt_tokens'])} / {_fmt_int(s['completion_tokens'])}",
                f"{s['cost_usd']:.4f}",
                f"{s['wall_seconds']:.1f}",
                state,
            )
        console.print(table)
        for s in st["stages"]:
            for model, m in sorted(s.get("models", {}).items()):
                console.print(
                    f"  {s['stage']}: {model}: {m.get('calls', 0):,.0f} calls, "
                    f"{m.get('prompt_tokens', 0):,.0f} prompt + "
                    f"{m.get('completion_tokens', 0):,.0f} completion tokens, "
                    f"${m.get('cost_usd', 0):.4f}"
                )
        for s in st["stages"]:
            extra = s["extra"]
            if s.get("judge"):
                for line in judge_lines(s["judge"]):
                    console.print(f"  {escape(s['stage'])}: {escape(line)}", soft_wrap=True)
                extra = {
                    k: v
                    for k, v in extra.items()
                    if k not in JUDGE_KEYS and not k.startswith("stop:")
                }
            if extra:
                items = ", ".join(
                    f"{k} {v:,.0f}" if float(v).is_integer() else f"{k} {v:,.2f}"
                    for k, v in sorted(extra.items())
                )
                console.print(f"  {escape(s['stage'])}: {escape(items)}")
        for s in st["stages"]:
            if s["flagged"]:
                console.print(f"[yellow]flagged:[/yellow] {escape(reject_summary(s))}")
        for problem in st["corrupt"]:
            console.print(f"[red]corrupt:[/red] {escape(problem)}")
        console.print("complete" if st["complete"] else "incomplete: run the pipeline again")
    if st["corrupt"]:
        if not as_json:
            console.print("run the pipeline again: it recomputes the units whose files fail")
        raise typer.Exit(EXIT_CORRUPT)
    if not st["complete"]:
        raise typer.Exit(EXIT_INCOMPLETE)
    if strict and st["flagged"]:
        raise typer.Exit(EXIT_FLAGGED)
    raise typer.Exit(0)


@app.command()
def validate(
    data: str = typer.Argument(..., help="A BEIR folder, a corpus file, or a save_to_disk folder."),
    format: str = typer.Option("auto", help="auto, beir, jsonl, parquet or hf."),
    queries: str | None = typer.Option(None, help="Queries file (jsonl/parquet sources)."),
    qrels: list[str] = typer.Option([], help="Qrels file(s) (jsonl/parquet sources)."),
    show: int = typer.Option(10, help="How many findings of each kind to list."),
) -> None:
    """Run the ingest checks alone and print what they found (exit 1 on errors)."""
    from rankmill.stages.ingest import CHECKS, IngestParams, Policies, read_collection

    try:
        # Report every finding; nothing stops at the first.
        params = IngestParams(
            source=data,
            format=format,  # type: ignore[arg-type]
            queries=queries,
            qrels=qrels,
            policies=Policies(**{k: "keep" for k in CHECKS}),
        )
        coll = read_collection(params, lambda p: str(Path(p).expanduser().resolve()))
    except RankmillError as exc:
        raise _error(exc, 2) from exc
    console.print(
        f"read {coll.corpus.num_rows:,} documents, {coll.queries.num_rows:,} queries, "
        f"{coll.qrels.num_rows:,} judgments, {coll.exclusions.num_rows:,} exclusions "
        f"from {', '.join(coll.files)}"
    )
    defaults = Policies()
    counts = coll.counts()
    if not counts:
        console.print("[green]no problems found[/]")
        raise typer.Exit(0)
    table = Table(title="findings")
    for col in ("check", "count", "in a run (default)", "what it means"):
        table.add_column(col)
    for kind in CHECKS:
        if kind in counts:
            table.add_row(kind, f"{counts[kind]:,}", getattr(defaults, kind), CHECKS[kind])
    console.print(table)
    by_kind: dict[str, int] = {}
    for f in coll.findings:
        by_kind[f.kind] = by_kind.get(f.kind, 0) + 1
        if by_kind[f.kind] <= show:
            console.print(f"  {escape(f.where())}: [bold]{f.kind}[/]: {escape(f.detail)}")
        elif by_kind[f.kind] == show + 1:
            console.print(f"  ... more {f.kind} findings")
    fatal = [k for k in counts if getattr(defaults, k) == "error"]
    raise typer.Exit(1 if fatal else 0)


@app.command()
def show(
    run_dir: str = typer.Argument(..., help="A run directory."),
    table: str = typer.Argument(..., help="STAGE.TABLE, e.g. mine.negatives or label.rejects."),
    limit: int = typer.Option(10, help="Rows to print (0: none)."),
    out: Path | None = typer.Option(
        None, help="Also write the whole table to this .parquet, .jsonl or .csv file."
    ),
) -> None:
    """Print (or write out) a committed table of a run."""
    from rankmill.manifest import RunDir

    stage, _, name = table.partition(".")
    if not name:
        err_console.print("[red]error:[/red] give the table as STAGE.TABLE, e.g. mine.negatives")
        raise typer.Exit(2)
    try:
        data = RunDir(run_dir).read_table(stage, name)
    except RankmillError as exc:
        raise _error(exc, 2) from exc
    columns = ", ".join(data.column_names)
    console.print(escape(f"{table}: {data.num_rows:,} rows; columns: {columns}"))
    if limit > 0 and data.num_rows:
        view = Table(show_lines=False)
        for col in data.column_names:
            view.add_column(escape(col), overflow="fold")
        for row in data.slice(0, limit).to_pylist():
            view.add_row(*[escape(_cell(row[c])) for c in data.column_names])
        console.print(view)
    if out is not None:
        _write_table(data, out)
        console.print(f"wrote {data.num_rows:,} rows to {out}")


@app.command()
def prompt(
    name: str = typer.Argument(..., help="Template name: prompts/<NAME>.j2, e.g. rank_window."),
    example: bool = typer.Option(
        False, "--example", help="Render it with example data (a run's, or the sample corpus)."
    ),
    run_dir: str | None = typer.Option(
        None, "--run", help="Take the example query and documents from this run directory."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print the chat messages as JSON."),
) -> None:
    """Print a prompt template, or the chat messages it renders to with --example."""
    from rankmill.stage import load_prompt

    try:
        if not example:
            console.print(load_prompt(name), markup=False, highlight=False)
            return
        from rankmill.examples import example_messages

        messages = example_messages(name, run_dir=run_dir)
    except RankmillError as exc:
        raise _error(exc, 2) from exc
    if as_json:
        console.print_json(json.dumps(messages))
        return
    for m in messages:
        console.rule(m["role"])
        console.print(m["content"], markup=False, highlight=False)


@app.command()
def publish(
    run_dir: str = typer.Argument(..., help="A run directory with a complete export stage."),
    repo: str = typer.Option(..., "--repo", help="Hub dataset repo, ORG/NAME."),
    private: bool = typer.Option(False, "--private", help="Create the repo private."),
    create_pr: bool = typer.Option(False, "--create-pr", help="Open a pull request instead."),
    license_: str = typer.Option("other", "--license", help="License in the dataset card."),
) -> None:
    """Publish the exported views as one Hub dataset (token from HF_TOKEN)."""
    from rankmill.publish import publish as do_publish

    try:
        result = do_publish(run_dir, repo, private=private, create_pr=create_pr, license=license_)
    except RankmillError as exc:
        raise _error(exc, 2) from exc
    what = "committed" if result.committed else "unchanged, no commit"
    console.print(f"{result.repo_id}: {what} ({result.files} files) {result.pr_url or result.url}")


@app.command()
def report(
    run_dir: str = typer.Argument(..., help="A run directory."),
    out: Path | None = typer.Option(None, help="Where to write it (default RUN_DIR/report.html)."),
) -> None:
    """Write a self-contained HTML report of a run (opens offline)."""
    from rankmill.report import write_report

    try:
        path = write_report(run_dir, str(out) if out else None)
    except RankmillError as exc:
        raise _error(exc, 2) from exc
    console.print(f"wrote {path}")


def _cell(value: Any, width: int = 80) -> str:
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def _write_table(data: Any, out: Path) -> None:
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq

    out.parent.mkdir(parents=True, exist_ok=True)
    suffix = out.suffix.lower()
    if suffix == ".parquet":
        pq.write_table(data, out)
    elif suffix == ".jsonl":
        with out.open("w", encoding="utf-8") as f:
            for row in data.to_pylist():
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
    elif suffix == ".csv":
        pacsv.write_csv(data, out)
    else:
        err_console.print(f"[red]error:[/red] {out}: use .parquet, .jsonl or .csv")
        raise typer.Exit(2)


journal_app = typer.Typer(no_args_is_help=True, help="The run's LLM response journal.")
app.add_typer(journal_app, name="journal")


@journal_app.command("compact")
def journal_compact(
    run_dir: str = typer.Argument(..., help="A run directory (a path or an s3:// URI)."),
) -> None:
    """Merge the journal's segments into one (one entry per request key; totals kept)."""
    from rankmill.llm.journal import compact

    try:
        rep = compact(run_dir)
    except RankmillError as exc:
        raise _error(exc, 2) from exc
    console.print(
        f"journal: {rep.segments_before} -> {rep.segments_after} segment(s), "
        f"{rep.entries:,} entries, {rep.bytes_before / 2**20:,.1f} -> "
        f"{rep.bytes_after / 2**20:,.1f} MiB in {rep.seconds:.1f}s"
    )


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
