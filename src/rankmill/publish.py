"""Publish a run's export to the Hugging Face Hub: every view a config of one dataset repo,
with a dataset card, in one commit.

``rankmill publish RUN_DIR --repo ORG/NAME [--private] [--create-pr]`` reads the files the
``export`` stage committed (verified against their sha256), writes ``README.md`` (YAML front
matter with ``configs``, license, task categories and size; the pipeline config; provenance:
models, prompt hashes, counts kept and rejected by reason, cost; the report's figures as
tables) and commits all of it with ``huggingface_hub``. Files the run no longer has are
deleted in the same commit. An unchanged run published again makes no commit (the Hub
reports every file as already there).

The token is read from ``HF_TOKEN`` only (never from a file or the command line). Nothing is
uploaded when any file holds the token or the value of an environment variable an endpoint
names in ``api_key_env``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any

import yaml

from rankmill.errors import RankmillError
from rankmill.manifest import RunDir


class PublishError(RankmillError):
    """Publishing cannot go ahead (no token, a secret in a file, no export)."""


TASK_CATEGORIES = ["text-retrieval", "text-ranking"]


@dataclass
class PublishResult:
    repo_id: str
    commit: str  # the commit the repo (or PR) is at after publishing
    committed: bool  # False when nothing changed and no commit was made
    url: str
    pr_url: str | None
    files: int


def size_category(rows: int) -> str:
    for limit, name in (
        (1_000, "n<1K"),
        (10_000, "1K<n<10K"),
        (100_000, "10K<n<100K"),
        (1_000_000, "100K<n<1M"),
        (10_000_000, "1M<n<10M"),
    ):
        if rows < limit:
            return name
    return "n>10M"


def _redact_url(url: str | None) -> str | None:
    if not url:
        return url
    url = re.sub(r"//[^/@]+@", "//", url)  # user:password@
    return url.split("?", 1)[0]


def provenance(rd: RunDir, pipeline: dict[str, Any]) -> dict[str, Any]:
    """Models each stage called, the sha256 of each prompt template a stage renders."""
    from rankmill.config import StageParams  # noqa: F401  (pydantic models below)
    from rankmill.stages import stage_class

    endpoints = pipeline.get("endpoints", {}) or {}
    models = {
        name: {
            "model": ep.get("model"),
            "base_url": "local llama.cpp" if ep.get("local") else _redact_url(ep.get("base_url")),
            "sampling": ep.get("sampling") or {},
        }
        for name, ep in endpoints.items()
    }
    stages = {}
    for name, params in (pipeline.get("stages") or {}).items():
        kind = (params or {}).get("uses") or name
        entry: dict[str, Any] = {"type": kind}
        try:
            cls = stage_class(kind)
            prompts = {}
            for p in getattr(cls, "prompts", ()) or ():
                from rankmill.stage import load_prompt

                prompts[p] = hashlib.sha256(load_prompt(p).encode()).hexdigest()
            if prompts:
                entry["prompt_sha256"] = prompts
        except Exception:  # a plug-in stage that cannot be imported here: no prompt hashes
            pass
        used = [
            v
            for k, v in (params or {}).items()
            if k in ("endpoint",) and isinstance(v, str) and v in endpoints
        ]
        for k in ("endpoints", "judges"):
            for v in (params or {}).get(k) or []:
                n = v if isinstance(v, str) else (v or {}).get("endpoint")
                if n in endpoints:
                    used.append(n)
        if used:
            entry["models"] = [models[u]["model"] for u in used]
        stages[name] = entry
    plan = rd.read_plan("export")
    return {"endpoints": models, "stages": stages, "export_fingerprint": plan and plan.fingerprint}


def _pipeline_yaml(pipeline: dict[str, Any]) -> str:
    keep = {k: pipeline[k] for k in ("run", "endpoints", "stages") if k in pipeline}
    for ep in (keep.get("endpoints") or {}).values():
        if isinstance(ep, dict) and ep.get("base_url"):
            ep["base_url"] = _redact_url(ep["base_url"])
    return yaml.safe_dump(keep, sort_keys=False, allow_unicode=True)


def dataset_card(
    run_dir: str,
    manifest: dict[str, Any],
    repo_id: str,
    license: str = "other",  # noqa: A002
    summary: dict[str, Any] | None = None,
) -> str:
    """The README.md of the published dataset."""
    from rankmill.report import run_summary, summary_markdown

    rd = RunDir(run_dir)
    pipeline = rd.read_pipeline() or {}
    summary = summary if summary is not None else run_summary(run_dir)
    built = [v for v in manifest["views"] if v["status"] == "built"]
    parquet = [f for f in manifest["files"] if f["format"] == "parquet"]
    configs = []
    for v in built:
        splits = sorted({f["split"] for f in parquet if f["view"] == v["view"]})
        configs.append(
            {
                "config_name": v["view"],
                "data_files": [
                    {"split": s, "path": f"{v['view']}/{s}-*.parquet"}
                    for s in sorted(splits, key=lambda s: (s != "train", s))
                ],
            }
        )
    total_rows = sum(f["rows"] or 0 for f in parquet)
    front = {
        "license": license,
        "task_categories": TASK_CATEGORIES,
        "language": ["en"],
        "size_categories": [size_category(total_rows)],
        "tags": ["rankmill", "retrieval", "reranking", "hard-negatives", "synthetic"],
        "pretty_name": repo_id.split("/")[-1],
        "configs": configs,
    }
    prov = provenance(rd, pipeline)
    views_rows = [
        f"| `{v['view']}` | {v['train_rows']} | {v['validation_rows']} | "
        f"{', '.join(f'`{c}`' for c in v['columns'] or [])} |"
        for v in built
    ]
    skipped = [f"- `{v['view']}`: {v['reason']}" for v in manifest["views"] if v not in built]
    run_name = pipeline.get("run", {}).get("name", "")
    first = built[0]["view"] if built else "n-tuple"
    body = [
        f"# {repo_id.split('/')[-1]}",
        "",
        "Training data for retrievers and rerankers made by rankmill "
        f"(run `{run_name}`). Each view is a config; splits are by query (no query is in "
        "both).",
        "",
        "```python",
        "from datasets import load_dataset",
        f'train = load_dataset("{repo_id}", "{first}", split="train")',
        "```",
        "",
        "## Views",
        "",
        "| config | train rows | validation rows | columns |",
        "|---|---|---|---|",
        *views_rows,
    ]
    if skipped:
        body += ["", "Not built in this run:", "", *skipped]
    body += [
        "",
        "## Provenance",
        "",
        "Models (by endpoint):",
        "",
        *[
            f"- `{n}`: {m['model']} ({m['base_url']})"
            + (f", sampling {json.dumps(m['sampling'])}" if m["sampling"] else "")
            for n, m in prov["endpoints"].items()
        ],
        "",
        "Stages, the models they called and their prompt templates (sha256):",
        "",
    ]
    for name, entry in prov["stages"].items():
        line = f"- `{name}` ({entry['type']})"
        if entry.get("models"):
            line += f": {', '.join(entry['models'])}"
        body.append(line)
        for p, h in (entry.get("prompt_sha256") or {}).items():
            body.append(f"  - prompt `{p}`: `{h}`")
    body += [
        "",
        "## What happened to the data",
        "",
        summary_markdown(summary),
        "## Pipeline",
        "",
        "Filters, thresholds and every other setting of the run:",
        "",
        "```yaml",
        _pipeline_yaml(pipeline).rstrip(),
        "```",
        "",
    ]
    return "---\n" + yaml.safe_dump(front, sort_keys=False) + "---\n\n" + "\n".join(body)


def _secrets(pipeline: dict[str, Any], token: str) -> list[tuple[str, str]]:
    """(name, value) of every secret that must not leave the machine."""
    out = [("HF_TOKEN", token)]
    for ep in (pipeline.get("endpoints") or {}).values():
        env = (ep or {}).get("api_key_env")
        if env and os.environ.get(env):
            out.append((env, os.environ[env]))
    return [(n, v) for n, v in out if v and len(v) >= 6]


def publish(
    run_dir: str,
    repo_id: str,
    private: bool = False,
    create_pr: bool = False,
    license: str = "other",  # noqa: A002
    export_stage: str = "export",
    endpoint: str | None = None,
) -> PublishResult:
    """Publish ``run_dir``'s export to ``repo_id`` (see the module docstring)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    from rankmill.stages.export import export_files

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise PublishError("set HF_TOKEN to a Hub token with write access to publish")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise PublishError(f"--repo {repo_id!r}: give it as ORG/NAME")
    manifest, data = export_files(run_dir, export_stage)
    rd = RunDir(run_dir)
    pipeline = rd.read_pipeline() or {}
    # the load_from_disk copies stay local: on the Hub each view is its Parquet shards
    upload = {p: b for p, b in data.items() if "/disk/" not in p}
    upload["README.md"] = dataset_card(run_dir, manifest, repo_id, license).encode()
    upload["rankmill_manifest.json"] = json.dumps(manifest, indent=1, sort_keys=True).encode()
    for name, secret in _secrets(pipeline, token):
        needle = secret.encode()
        leaks = sorted(p for p, b in upload.items() if needle in b)
        if leaks:
            raise PublishError(
                f"not published: {', '.join(leaks)} contain the value of {name}; remove it "
                "from the data (and rotate the secret) before publishing"
            )

    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.dataset_info(repo_id)
    before = info.sha
    remote = {s.rfilename for s in info.siblings or []}
    ops: list[Any] = [
        CommitOperationAdd(path_in_repo=p, path_or_fileobj=b) for p, b in upload.items()
    ]
    ops += [
        CommitOperationDelete(path_in_repo=p)
        for p in sorted(remote - set(upload))
        if p != ".gitattributes"
    ]
    commit = api.create_commit(
        repo_id,
        operations=ops,
        commit_message=f"rankmill: publish run {pipeline.get('run', {}).get('name', '')}".strip(),
        repo_type="dataset",
        create_pr=create_pr,
    )
    return PublishResult(
        repo_id=repo_id,
        commit=commit.oid,
        committed=commit.oid != before,
        url=commit.commit_url,
        pr_url=commit.pr_url,
        files=len(upload),
    )
