"""llama.cpp's own llama-server on a kvq cache: the command line, start, readiness, stop.

`kvq serve` and the load benchmark run the patched `llama-server` (its OpenAI-compatible API,
parallel slots, metrics) with `--kvq POLICY[@BITS]`; stock policies (`stock-f16`, `stock-q4_0`)
run the same binary with llama.cpp's own cache, which is what side-by-side runs compare against.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from kvq_cli.errors import BadOption, KvqError
from kvq_cli.runtime.engine import ModelRef
from kvq_cli.runtime.kv import KvPolicy, check_budget
from kvq_cli.runtime.tools import tool_path

READY_TIMEOUT_S = 180.0   # model load + warm-up on a slow machine


class ServerError(KvqError):
    """llama-server did not start, or stopped on its own."""


@dataclass(frozen=True)
class ServeConfig:
    """What `kvq serve` starts: a policy, slots of `ctx` tokens each, where it listens."""

    policy: KvPolicy
    parallel: int = 4
    ctx: int = 2048            # tokens per slot (llama-server's -c is parallel x ctx)
    host: str = "127.0.0.1"
    port: int = 8080           # 0: a free port
    threads: int | None = None
    kv_window: int | None = None
    kv_bits: float | None = None
    extra: tuple[str, ...] = ()   # further llama-server arguments, passed as they are

    def check(self) -> None:
        """Refuse values llama-server would fail on later, with one line each."""
        if self.parallel < 1:
            raise BadOption(f"--parallel must be >= 1, got {self.parallel}")
        if self.ctx < 64:
            raise BadOption(f"--ctx must be >= 64 tokens per slot, got {self.ctx}")
        if not (0 <= self.port <= 65535):
            raise BadOption(f"--port must be between 0 and 65535, got {self.port}")
        if self.policy.kvq == "assign":
            raise BadOption(f"--kv {self.policy.name} is for `kvq eval` only (it needs the text in advance)")
        if self.policy.is_stock and (self.kv_window is not None or self.kv_bits is not None):
            raise BadOption("--kv-window/--kv-bits apply to kvq policies, not " + self.policy.name)
        if self.kv_bits is not None:
            check_budget(self.kv_bits)
        if self.kv_window is not None and self.kv_window < 0:
            raise BadOption(f"--kv-window must be >= 0, got {self.kv_window}")


def cache_args(policy: KvPolicy, kv_window: int | None = None, kv_bits: float | None = None,
               controller_file: Path | None = None) -> list[str]:
    """The llama.cpp arguments for a --kv policy: --kvq for kvq policies, -ctk/-ctv/-fa for stock ones."""
    if policy.is_stock:
        t = policy.ggml_type.lower()
        return ["-ctk", t, "-ctv", t, "-fa", "on" if policy.needs_flash else "off"]
    args = ["--kvq", policy.name]
    if kv_bits is not None:
        args += ["--kvq-bits", f"{kv_bits:g}"]
    if kv_window is not None:
        args += ["--kvq-window", str(kv_window)]
    if controller_file is not None:
        args += ["--kvq-controller", str(controller_file)]
    return args


def free_port(host: str) -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _first_error(log: Path) -> str:
    """The line of a llama-server log that says why it stopped: kvq's own error, else the first error
    (the later ones repeat its consequences), else the last line; without llama.cpp's timestamp."""
    try:
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return "no log"
    errors = [ln for ln in lines if re.search(r"^\S+ E |\berror\b|failed", ln, re.IGNORECASE)]
    line = next((ln for ln in errors if "kvq:" in ln), None) or (errors or lines or ["no output"])[0 if errors else -1]
    return re.sub(r"^\d+\.\d+\.\d+\.\d+ [A-Z] ", "", line)


class Server:
    """A running llama-server (context manager): start() waits until /health answers, stop() ends it."""

    def __init__(self, model: ModelRef, cfg: ServeConfig, log_path: Path | None = None):
        cfg.check()
        self.model, self.cfg = model, cfg
        self.port = cfg.port or free_port(cfg.host)
        self.proc: subprocess.Popen | None = None
        self._tmp: str | None = None
        self.log_path = log_path
        self.started_s = 0.0   # seconds from launch to ready

    @property
    def url(self) -> str:
        return f"http://{self.cfg.host}:{self.port}"

    def command(self, controller_file: Path | None = None) -> list[str]:
        """The llama-server command line."""
        cfg = self.cfg
        threads = str(cfg.threads or os.cpu_count() or 1)
        return [str(tool_path("llama-server")), "-m", str(self.model.path),
                "-c", str(cfg.ctx * cfg.parallel), "-np", str(cfg.parallel),
                "--host", cfg.host, "--port", str(self.port), "-t", threads, "-tb", threads,
                *cache_args(cfg.policy, cfg.kv_window, cfg.kv_bits, controller_file), *cfg.extra]

    def start(self) -> "Server":
        controller_file = None
        self._tmp = tempfile.mkdtemp(prefix="kvq-serve-")
        if not self.cfg.policy.is_stock and self.model.controller is not None:
            # a controller kvq supplies (shipped or generic) goes to the runtime as a controller file
            from kvq_cli.controller.embed import write_controller_file
            from kvq_cli.controller.spec import load_controller

            controller_file = write_controller_file(load_controller(self.model.controller),
                                                    Path(self._tmp) / "controller.gguf")
        if self.log_path is None:
            self.log_path = Path(self._tmp) / "llama-server.log"
        cmd = self.command(controller_file)
        t0 = time.monotonic()
        with open(self.log_path, "wb") as log:
            # a session of its own: a Ctrl-C in the terminal reaches kvq, which then stops the server
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        self.started_s = time.monotonic() - t0
        return self

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerError(f"llama-server stopped (exit {self.proc.returncode}): {_first_error(self.log_path)}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise ServerError(f"llama-server did not answer on {self.url} within {READY_TIMEOUT_S:.0f} s")

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def memory_mib(self) -> dict[str, float]:
        """The server's resident memory now and at its peak (VmRSS, VmHWM), MiB."""
        out = {}
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                key, _, value = line.partition(":")
                if key in ("VmRSS", "VmHWM"):
                    out[{"VmRSS": "rss", "VmHWM": "peak_rss"}[key]] = int(value.split()[0]) / 1024
        except (OSError, ValueError, AttributeError):
            pass
        return out

    def kv_mib(self) -> float:
        """KV memory of the server's context (parallel x ctx tokens): what llama.cpp allocates for a stock
        cache; for kvq, its cap at the policy's bits (block scales and window included; its stock tensors
        get no memory), a static pool's own size, and for rule/adaptive without @BITS (no cap) f16, their
        worst case."""
        from kvq_cli.controller.spec import EFF_BITS_OF
        from kvq_cli.gguf.read import model_dims, read_gguf

        _, dims = model_dims(read_gguf(self.model.path))
        p = self.cfg.policy
        if p.is_stock:
            bits = p.bits_per_elem
        elif p.kvq == "static":
            bits = EFF_BITS_OF[p.static_bits]
        else:
            bits = p.budget_bits or self.cfg.kv_bits or 16.0
        return self.cfg.ctx * self.cfg.parallel * dims.kv_elems_per_token * bits / 8 / 2**20

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGTERM (llama-server finishes its slots and exits), SIGKILL after `timeout`; the exit code."""
        rc = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            rc = self.proc.returncode
        if self._tmp is not None:   # the controller file, and the log unless the caller placed it
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._tmp = None
        return rc

    def __enter__(self) -> "Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
