"""`kvq serve` end to end on the real model: llama.cpp's llama-server on a kvq cache, reached with the
`openai` client as apps reach it; concurrent slots give each request the text it gets alone; SIGTERM
stops it cleanly; bad input is one line. Also llama-bench and llama-perplexity with --kvq."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time

import pytest

from kvq_cli.runtime.server import free_port
from kvq_cli.runtime.tools import tool_path

from .conftest import TEXT

KVQ = [sys.executable, "-m", "kvq_cli"]
PROMPTS = ["Name three colours.", "What is the capital of France?", "Write one sentence about the sea.",
           "Count from one to five in words."]


def _start(args: list[str], timeout: float = 180.0):
    """`kvq serve ARGS` in the background; (process, base URL) once it printed its URL."""
    proc = subprocess.Popen(KVQ + ["serve", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + timeout
    line = ""
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.startswith("http://") or proc.poll() is not None:
            break
    assert line.startswith("http://"), f"kvq serve did not start: {proc.stderr.read() if proc.poll() is not None else line}"
    return proc, line.strip()


@pytest.fixture(scope="module")
def served(model_path):
    # a window of 16 rows: the adaptive controller decides rows within these short chats
    port = free_port("127.0.0.1")
    proc, url = _start([str(model_path), "--kv", "adaptive@3", "--kv-window", "16", "--parallel", "4",
                        "--ctx", "512", "--port", str(port), "--threads", "2"])
    yield proc, url
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


def _chat(client, prompt: str) -> str:
    # cache_prompt false: each request from an empty slot (a reused prefix keeps the precisions its rows
    # got with what followed them; llama.cpp documents prompt caching as not bit-exact anyway)
    r = client.chat.completions.create(model="kvq", messages=[{"role": "user", "content": prompt}],
                                       temperature=0, max_tokens=48, seed=0, extra_body={"cache_prompt": False})
    return r.choices[0].message.content


def test_openai_client_streams_a_chat_completion(served):
    openai = pytest.importorskip("openai")
    _, url = served
    client = openai.OpenAI(base_url=url, api_key="none")
    chunks = list(client.chat.completions.create(model="kvq", messages=[{"role": "user", "content": PROMPTS[0]}],
                                                 temperature=0, max_tokens=32, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(chunks) > 4 and len(text.split()) >= 3


def test_concurrent_clients_each_get_the_text_they_get_alone(served):
    openai = pytest.importorskip("openai")
    _, url = served
    client = openai.OpenAI(base_url=url, api_key="none")
    alone = [_chat(client, p) for p in PROMPTS]
    together: list[str | None] = [None] * len(PROMPTS)

    def run(i: int) -> None:
        together[i] = _chat(openai.OpenAI(base_url=url, api_key="none"), PROMPTS[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(PROMPTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert together == alone
    assert all(len(t.split()) >= 3 for t in alone)


def test_sigterm_stops_the_server_cleanly(model_path):
    port = free_port("127.0.0.1")
    proc, url = _start([str(model_path), "--kv", "q4", "--parallel", "1", "--ctx", "256", "--port", str(port),
                        "--threads", "2"])
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "stopped" in err
    import socket
    with socket.socket() as s:   # llama-server is gone with it: nothing listens on the port
        assert s.connect_ex(("127.0.0.1", port)) != 0


@pytest.mark.parametrize("args,why", [
    (["missing.gguf"], "missing.gguf"),
    (["--parallel", "0"], "--parallel must be >= 1"),
    (["--kv", "oracle@3"], "kvq eval"),
])
def test_serve_bad_input_is_one_line(args, why):
    r = subprocess.run(KVQ + ["serve", *args, "--port", "0"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and why in lines[0] and "Traceback" not in r.stderr


def test_llama_bench_prints_its_table_with_kvq(model_path, tmp_path):
    from kvq_cli.controller.catalog import shipped_path
    from kvq_cli.controller.embed import write_controller_file
    from kvq_cli.controller.spec import load_controller

    ctrl = write_controller_file(load_controller(shipped_path("smollm2-135m-instruct")), tmp_path / "ctrl.gguf")
    r = subprocess.run([str(tool_path("llama-bench")), "-m", str(model_path), "--kvq", "off,adaptive@3.5",
                        "--kvq-controller", str(ctrl), "-p", "64", "-n", "8", "-r", "1", "-t", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [ln for ln in r.stdout.splitlines() if ln.startswith("|") and ("pp64" in ln or "tg8" in ln)]
    assert len(rows) == 4 and sum("adaptive@3.5" in ln for ln in rows) == 2
    assert "kvq" in r.stdout.splitlines()[0]


def test_llama_perplexity_runs_on_the_kvq_cache(model_path, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(TEXT[:20000])
    ppl = {}
    for kv in ("off", "q4"):
        extra = [] if kv == "off" else ["--kvq", kv]
        r = subprocess.run([str(tool_path("llama-perplexity")), "-m", str(model_path), "-f", str(text), "-c", "256",
                            "--chunks", "3", "-t", "2", *extra], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-2000:]
        m = re.search(r"Final estimate: PPL = ([\d.]+)", r.stdout + r.stderr)
        assert m, (r.stdout + r.stderr)[-2000:]
        ppl[kv] = float(m.group(1))
    assert 1.0 < ppl["off"] < ppl["q4"] < 1.1 * ppl["off"]   # q4 costs a little perplexity, not much
