"""Publishing to a loopback Hub that speaks huggingface_hub's HTTP API: one commit with every
view as a config, load_dataset reads the same rows back, an unchanged run makes no commit,
and no secret is uploaded."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from rankmill.publish import dataset_card, size_category
from rankmill.stages.export import export_files
from tests.fixtures.export_data import export_run
from tests.fixtures.hub_server import FakeHub

REPO = Path(__file__).resolve().parents[1]

LOAD = """
import json, sys
from datasets import load_dataset
repo, config = sys.argv[1], sys.argv[2]
ds = load_dataset(repo, config)
print(json.dumps({s: ds[s].to_list() for s in ds}))
"""


def _env(hub: FakeHub, tmp_path: Path, token: str | None) -> dict[str, str]:
    env = dict(os.environ)
    for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        env.pop(k, None)
    env.update(
        HF_ENDPOINT=hub.url,
        HF_HUB_DISABLE_XET="1",
        HF_HOME=str(tmp_path / "hf-home"),
        PYTHONPATH=os.pathsep.join(
            p for p in (env.get("PYTHONPATH"), str(REPO / "src"), str(REPO)) if p
        ),
    )
    env.pop("HF_TOKEN", None)
    if token:
        env["HF_TOKEN"] = token
    return env


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rankmill.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_publish_loads_back_makes_no_second_commit_and_uploads_no_secret(tmp_path, ray_session):
    run_dir = export_run(str(tmp_path / "run"), save_to_disk=True)
    manifest, files = export_files(run_dir)
    canary = f"hf_canary_{uuid.uuid4().hex}"
    api_secret = f"sk-canary-{uuid.uuid4().hex}"
    with FakeHub(token=canary) as hub:
        env = _env(hub, tmp_path, canary)
        env["SOME_API_KEY"] = api_secret

        # no token in the environment: refused before anything is sent
        out = _cli(["publish", run_dir, "--repo", "acme/qs"], _env(hub, tmp_path, None))
        assert out.returncode == 2 and "HF_TOKEN" in out.stderr + out.stdout
        assert hub.requests() == []

        out = _cli(["publish", run_dir, "--repo", "acme/qs", "--private"], env)
        assert out.returncode == 0, out.stdout + out.stderr
        assert "committed" in out.stdout
        commits = hub.commits("acme/qs")
        assert len(commits) == 2  # the repo's initial commit and ours: one commit for all

        remote = hub.files("acme/qs")
        built = [v["view"] for v in manifest["views"] if v["status"] == "built"]
        card = remote["README.md"].decode()
        front = yaml.safe_load(card.split("---\n")[1])
        assert [c["config_name"] for c in front["configs"]] == built
        assert front["license"] and front["task_categories"] and front["size_categories"]
        assert "## Provenance" in card and "## Pipeline" in card
        assert "Rows, rejects, LLM calls and cost by stage" in card and "| tables |" in card
        assert not any("/disk/" in p for p in remote)
        for f in manifest["files"]:
            if f["format"] == "parquet":
                assert remote[f["path"]] == files[f["path"]]

        # load_dataset through the Hub API returns the exported rows, split by split
        for config in ("n-tuple", "pointwise", "tevatron-inline"):
            res = subprocess.run(
                [sys.executable, "-c", LOAD, "acme/qs", config],
                env=env,
                capture_output=True,
                text=True,
                timeout=300,
            )
            assert res.returncode == 0, res.stderr[-3000:]
            loaded = json.loads(res.stdout.strip().splitlines()[-1])
            for split in ("train", "validation"):
                parts = [
                    pq.read_table(pa.BufferReader(files[f["path"]]))
                    for f in sorted(manifest["files"], key=lambda f: f["path"])
                    if f["view"] == config and f["split"] == split and f["format"] == "parquet"
                ]
                assert loaded[split] == pa.concat_tables(parts).to_pylist()

        # the same run again: every file is already there, no commit
        again = _cli(["publish", run_dir, "--repo", "acme/qs"], env)
        assert again.returncode == 0, again.stdout + again.stderr
        assert "no commit" in again.stdout
        assert hub.commits("acme/qs") == commits

        # --create-pr on a changed card opens a PR and leaves main alone
        pr = _cli(["publish", run_dir, "--repo", "acme/qs", "--create-pr", "--license", "mit"], env)
        assert pr.returncode == 0, pr.stdout + pr.stderr
        assert "discussions/1" in pr.stdout
        assert hub.commits("acme/qs") == commits
        assert b"license: mit" in hub.files("acme/qs", "refs/pr/1")["README.md"]

        blobs = hub.uploaded_blobs()
        assert blobs
        for blob in blobs:
            assert canary.encode() not in blob
            assert api_secret.encode() not in blob
        # the token went only into Authorization headers, never into a URL
        assert all(canary not in path for _, path, _ in hub.requests())


def test_card_front_matter_and_size_categories(tmp_path):
    assert size_category(10) == "n<1K"
    assert size_category(12_345) == "10K<n<100K"
    manifest = {
        "views": [
            {
                "view": "n-tuple",
                "status": "built",
                "reason": None,
                "train_rows": 3,
                "validation_rows": 1,
                "columns": ["anchor", "positive", "negative_1"],
            },
            {
                "view": "listwise-sft",
                "status": "skipped",
                "reason": "no listwise teacher table",
                "train_rows": None,
                "validation_rows": None,
                "columns": None,
            },
        ],
        "files": [
            {
                "view": "n-tuple",
                "split": "train",
                "path": "n-tuple/train-00000-of-00001.parquet",
                "format": "parquet",
                "rows": 3,
                "sha256": "x",
                "bytes": 1,
            },
            {
                "view": "n-tuple",
                "split": "validation",
                "path": "n-tuple/validation-00000-of-00001.parquet",
                "format": "parquet",
                "rows": 1,
                "sha256": "y",
                "bytes": 1,
            },
        ],
    }
    summary = {"run_name": "r", "stages": [], "rejects": []}
    run = tmp_path / "run"
    run.mkdir()
    (run / "pipeline.json").write_text(
        json.dumps(
            {
                "run": {"name": "r"},
                "endpoints": {
                    "t": {
                        "base_url": "https://user:pw@api.example.com/v1?key=abc",
                        "model": "teacher-1",
                        "api_key_env": "T_KEY",
                    }
                },
                "stages": {"export": {}},
            }
        )
    )
    card = dataset_card(str(run), manifest, "acme/x", summary=summary)
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["configs"] == [
        {
            "config_name": "n-tuple",
            "data_files": [
                {"split": "train", "path": "n-tuple/train-*.parquet"},
                {"split": "validation", "path": "n-tuple/validation-*.parquet"},
            ],
        }
    ]
    assert "listwise-sft`: no listwise teacher table" in card
    assert "teacher-1" in card
    assert "pw@" not in card and "key=abc" not in card
