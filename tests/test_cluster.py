"""The same pipeline on a two-node local Ray cluster gives the same outputs as on one node."""

from __future__ import annotations

import textwrap

import pytest

from rankmill.manifest import RunDir
from tests.fixtures.cli import run_python

SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster
    from rankmill.pipeline import validate_pipeline
    from rankmill.runner import Runner

    raw = json.loads(sys.argv[1])
    # Both nodes on loopback (conftest sets Ray's single-machine switch for the tests).
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        runner = Runner(validate_pipeline(raw), sys.argv[2], ray_address=cluster.address)
        runner._ray()  # connect now, to count the nodes the stages run on
        nodes = [n for n in ray.nodes() if n["Alive"]]
        print("NODES", len(nodes))
        print("ADDRESSES", sorted({n["NodeManagerAddress"] for n in nodes}))
        runner.run()
        print("DONE")
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_two_node_cluster_gives_same_outputs(tmp_path, repo, ray_session):
    import json

    from rankmill.pipeline import validate_pipeline
    from rankmill.runner import Runner

    log = tmp_path / "log.txt"
    raw = {
        "run": {"name": "cluster"},
        "stages": {
            "count": {
                "uses": "tests.fixtures.stages:CountStage",
                "n_units": 6,
                "sleep_s": 0.3,
                "workers": 2,
                "log_path": str(log),
            },
            "double": {
                "uses": "tests.fixtures.stages:DoubleStage",
                "workers": 2,
                "sleep_s": 0.2,
                "log_path": str(log),
            },
        },
    }
    local_dir = tmp_path / "local"
    Runner(validate_pipeline(raw), str(local_dir)).run()
    log.unlink()

    cluster_dir = tmp_path / "cluster"
    out = run_python(SCRIPT, [json.dumps(raw), str(cluster_dir)], repo)
    assert "NODES 2" in out and "DONE" in out
    assert "ADDRESSES ['127.0.0.1']" in out
    pids = {line.split()[2] for line in log.read_text().splitlines()}
    assert len(pids) >= 2, "units should have run in more than one worker process"
    a, b = RunDir(str(local_dir)), RunDir(str(cluster_dir))
    for stage, table in [("count", "items"), ("double", "doubled"), ("double", "rejects")]:
        assert a.read_table(stage, table).equals(b.read_table(stage, table))
