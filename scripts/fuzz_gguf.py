"""Fuzz kvq's GGUF paths with mutated copies of the tiny test model: zero crashes, one error line.

Every case (scripts/gguf_mutations.py: header fields, value types, counts and lengths, tensor infos,
kvq.controller.* values, hparams, tokenizer, truncations) goes through three paths:
    inspect  `kvq inspect FILE`                                   (typer's CliRunner)
    chat     `kvq chat FILE --prompt ... --max-tokens 4`          (the default adaptive cache)
    load     runtime.engine.Engine(FILE, kv=stock-f16) and one decode
in worker subprocesses that handle many files each. A case works (exit 0), fails cleanly (exit 1 with
exactly one line, `kvq: error: ...`, and nothing from native code), fails uncleanly (a traceback,
an internal error, several lines), or crashes: the worker died from a signal or hung, which the
runner records before it starts a new worker at the next path.

    python scripts/fuzz_gguf.py --cases 1200 --seed 0 --json results/fuzz_gguf.json --txt results/fuzz_gguf.txt
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import queue
import re
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [p for p in (str(ROOT), str(ROOT / "scripts")) if p not in sys.path]

PATHS = ("inspect", "chat", "load")
PROMPT = "Name three colours."
TIMEOUT_S = 120          # per path; a hang counts as a crash
MEMORY_LIMIT = 8 << 30   # address space of a worker: a huge allocation fails instead of swapping the machine
TINY = dict(n_layer=3, n_head=4, n_head_kv=2, head_dim=64)   # tests/conftest.py's tiny model


def build_base(out_dir: Path) -> Path:
    """The tiny random llama GGUF of the tests (tests/hf_fixture.py, `kvq convert`) with a controller
    embedded: the generic one plus a K centering of the model's shape, so every kvq.controller.* key is there."""
    import numpy as np

    from kvq_cli.controller.catalog import GENERIC
    from kvq_cli.controller.spec import load_controller
    from kvq_cli.models.convert import convert
    from kvq_cli.models.registry import embedded_path
    from tests.hf_fixture import build_tiny_checkpoint

    out = out_dir / "tiny-llama-kvq-f16.gguf"
    if out.is_file():
        return out
    ckpt = build_tiny_checkpoint(embedded_path(), out_dir / "tiny-llama", **TINY)
    ctrl = load_controller(GENERIC)
    rng = np.random.default_rng(0)
    ctrl.k_center = (rng.standard_normal((TINY["n_layer"], TINY["n_head_kv"] * TINY["head_dim"])) * 0.1).tolist()
    convert(ckpt, out, outtype="f16", controller=ctrl.validate())
    return out


# -- worker (one process, many files) --------------------------------------------------------------
def _run_cli(runner, app, args: list[str]) -> tuple[int, list[str], str]:
    r = runner.invoke(app, args)
    lines = [l for l in (r.stderr or "").splitlines() if l.strip()]
    exc = None if r.exception is None or isinstance(r.exception, SystemExit) else r.exception
    return r.exit_code, lines, repr(exc) if exc else ""


def _run_path(path: str, file: str) -> dict:
    from typer.testing import CliRunner

    from kvq_cli.cli.app import app
    from kvq_cli.errors import KvqError

    if path == "inspect":
        code, lines, exc = _run_cli(CliRunner(), app, ["inspect", file])
    elif path == "chat":
        code, lines, exc = _run_cli(CliRunner(), app, ["chat", file, "--prompt", PROMPT, "--max-tokens", "4",
                                                       "--ctx", "128", "--threads", "1"])
    else:
        from kvq_cli.runtime.engine import Engine
        from kvq_cli.runtime.kv import parse_kv

        code, lines, exc = 0, [], ""
        try:
            with Engine(file, kv=parse_kv("stock-f16"), n_ctx=128, n_threads=1) as e:
                e.decode(e.tokenize(PROMPT) or [0], 0)
        except KvqError as err:
            code, lines = 1, [f"kvq: error: {err.one_line()}"]
        except Exception as err:   # noqa: BLE001 (what the fuzz looks for)
            code, exc = 1, f"{type(err).__name__}: {err}"
    return {"code": code, "lines": lines, "exc": exc}


def worker() -> None:
    """Serve requests {"file", "paths"} from stdin; reply {"begin": path} before and a result after each."""
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_LIMIT, MEMORY_LIMIT))
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    capture = open(os.environ["KVQ_FUZZ_CAPTURE"], "w+b")   # native writes to fd 1 and 2 (ggml, llama.cpp) land here
    os.dup2(capture.fileno(), 1)
    os.dup2(capture.fileno(), 2)
    for line in sys.stdin:
        req = json.loads(line)
        for path in req["paths"]:
            proto.write(json.dumps({"begin": path}) + "\n")
            capture.seek(0)
            capture.truncate()
            res = _run_path(path, req["file"])
            capture.seek(0)
            res["native"] = capture.read(2000).decode("utf-8", "replace")
            res["path"] = path
            proto.write(json.dumps(res) + "\n")
        proto.write(json.dumps({"done": True}) + "\n")


# -- runner ------------------------------------------------------------------------------------
class Worker:
    """A worker subprocess and its line protocol (reads time out)."""

    def __init__(self, env: dict[str, str], capture: Path):
        self.capture = capture   # the worker's native output: an abort's message survives it
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     env={**env, "KVQ_FUZZ_CAPTURE": str(capture)})
        self.buf = ""
        self.timed_out = False

    def send(self, msg: dict) -> bool:
        """False if the worker is gone."""
        try:
            self.proc.stdin.write(json.dumps(msg) + "\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            return False
        return True

    def read(self, timeout: float) -> dict | None:
        """The next message; None if the worker died or did not answer in time (then it is killed)."""
        deadline = time.monotonic() + timeout
        fd = self.proc.stdout.fileno()
        while "\n" not in self.buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([fd], [], [], left)[0]:
                self.timed_out = True
                self.kill()
                return None
            chunk = os.read(fd, 1 << 16).decode("utf-8", "replace")
            if not chunk:
                return None
            self.buf += chunk
        line, self.buf = self.buf.split("\n", 1)
        return json.loads(line)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()

    def death(self) -> str:
        """Why the worker is gone (hung, the signal that killed it, or its exit status) and the first
        native lines it wrote (ggml's abort message)."""
        rc = self.proc.wait()
        why = "hung" if self.timed_out else f"killed by {signal.Signals(-rc).name}" if rc < 0 else f"exited with status {rc}"
        try:
            native = [l for l in self.capture.read_text(errors="replace").splitlines() if l.strip()]
        except OSError:
            native = []
        # (an abort while llama-cpp-python silences the load goes to /dev/null: no message then)
        msg = next((l for l in native if any(w in l for w in ("GGML_ASSERT", "GGML_ABORT", "terminate", "what()",
                                                                "error"))), None)
        return why + (f": {msg.strip()[:300]}" if msg else "")


def classify(res: dict) -> str:
    """ok | error (one `kvq: error:` line, nothing native) | unclean."""
    if res["code"] == 0 and not res["exc"]:
        return "ok"
    if (res["code"] == 1 and not res["exc"] and len(res["lines"]) == 1 and res["lines"][0].startswith("kvq: error: ")
            and not res["native"].strip()):
        return "error"
    return "unclean"


def normalise(line: str, file: str) -> str:
    """An error line with the case's file name and temp dirs replaced, so equal errors count together."""
    line = line.replace(file, "FILE")
    return re.sub(r"/tmp/[\w.-]*kvq-controller-\w+/", "TMP/", line)


def run_fuzz(base: Path, *, cases: int, seed: int = 0, workers: int = 1, keep: Path | None = None,
             first: int = 0, progress=None) -> dict:
    """Run cases first..first+cases-1; returns per-path counts, distinct error lines and every failure."""
    from gguf_mutations import Mutator

    mut = Mutator(base, seed)
    todo: queue.Queue = queue.Queue()
    for i in range(first, first + cases):
        todo.put(i)
    results: list[dict] = []
    lock = threading.Lock()
    tmp = tempfile.TemporaryDirectory(prefix="kvq-fuzz-")
    # GGML_NO_BACKTRACE: an abort prints its message, not a gdb session
    env = {**os.environ, "KVQ_HOME": str(Path(tmp.name) / "home"), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
           "GGML_NO_BACKTRACE": "1"}
    env.pop("KVQ_DEBUG", None)

    def slot(k: int) -> None:
        capture = Path(tmp.name) / f"native-w{k}.txt"
        w = Worker(env, capture)
        file = str(Path(tmp.name) / f"case-w{k}.gguf")
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                break
            desc, data = mut.case(i)
            Path(file).write_bytes(data)
            rec = {"case": i, "mutation": desc, "size": len(data)}
            paths = list(PATHS)
            while paths:
                if not w.send({"file": file, "paths": paths}):   # gone between cases: a fresh one
                    w.kill()
                    w = Worker(env, capture)
                    continue
                while paths:
                    msg = w.read(TIMEOUT_S)
                    if msg is not None and "begin" in msg:
                        msg = w.read(TIMEOUT_S)
                    if msg is None:   # died or hung in paths[0]
                        rec[paths.pop(0)] = {"status": "crash", "detail": w.death()}
                        w = Worker(env, capture)
                        break
                    status = classify(msg)
                    line = normalise(msg["lines"][0], file) if status == "error" else None
                    detail = None if status != "unclean" else {f: msg[f] for f in ("code", "lines", "exc", "native")}
                    rec[paths.pop(0)] = {"status": status, "line": line, "detail": detail}
                else:
                    if w.read(TIMEOUT_S) is None:   # no "done": gone after its last path, start afresh
                        w.kill()
                        w = Worker(env, capture)
            if keep is not None and any(rec[p]["status"] in ("crash", "unclean") for p in PATHS):
                keep.mkdir(parents=True, exist_ok=True)
                (keep / f"case-{i}.gguf").write_bytes(data)
            with lock:
                results.append(rec)
                if progress:
                    progress(rec)
        with contextlib.suppress(OSError):
            w.proc.stdin.close()
        w.kill()

    threads = [threading.Thread(target=slot, args=(k,)) for k in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    tmp.cleanup()
    if len(results) != cases:   # a runner thread failed: say so rather than report fewer cases
        raise RuntimeError(f"fuzz runner finished {len(results)} of {cases} cases")
    return summarise(sorted(results, key=lambda r: r["case"]))


def summarise(results: list[dict]) -> dict:
    """Per-path counts (cases, ok, clean errors, unclean, crashes), distinct error lines, failures."""
    paths = {}
    for p in PATHS:
        st = Counter(r[p]["status"] for r in results)
        lines = Counter(r[p]["line"] for r in results if r[p]["status"] == "error")
        paths[p] = {"cases": len(results), "ok": st["ok"], "clean_errors": st["error"], "unclean": st["unclean"],
                    "crashes": st["crash"], "distinct_errors": len(lines),
                    "errors": dict(sorted(lines.items(), key=lambda kv: (-kv[1], kv[0])))}
    failures = [{"case": r["case"], "mutation": r["mutation"], "path": p, **r[p]}
                for r in results for p in PATHS if r[p]["status"] in ("crash", "unclean")]
    kinds = defaultdict(Counter)
    for r in results:
        kinds[r["mutation"].split()[0]]["cases"] += 1
        for p in PATHS:
            kinds[r["mutation"].split()[0]][f"{p}_ok"] += r[p]["status"] == "ok"
    return {"paths": paths, "mutation_kinds": {k: dict(v) for k, v in sorted(kinds.items())}, "failures": failures,
            "case_results": results}


def text_summary(report: dict) -> str:
    """A short human summary of a report."""
    out = [f"kvq GGUF fuzz: {report['cases']} cases, seed {report['seed']}, {report['date']}, {report['cpu']}",
           f"command: {report['command']}", ""]
    out.append(f"{'path':8} {'cases':>6} {'ok':>6} {'errors':>7} {'unclean':>8} {'crashes':>8} {'distinct':>9}")
    for p, c in report["paths"].items():
        out.append(f"{p:8} {c['cases']:6} {c['ok']:6} {c['clean_errors']:7} {c['unclean']:8} {c['crashes']:8} "
                   f"{c['distinct_errors']:9}")
    for p, c in report["paths"].items():
        out += ["", f"most frequent {p} errors:"]
        out += [f"  {n:5}  {line[:150]}" for line, n in list(c["errors"].items())[:12]]
    if report["failures"]:
        out += ["", "failures:"] + [f"  case {f['case']} {f['path']}: {f['status']} {f['mutation']}" for f in report["failures"]]
    return "\n".join(out) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", type=int, default=1200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--base", help="base GGUF (default: build the tiny model with a controller in --base-dir)")
    ap.add_argument("--base-dir", default=str(Path(tempfile.gettempdir()) / "kvq-fuzz-base"))
    ap.add_argument("--keep", help="directory for the files of failing cases")
    ap.add_argument("--json", help="write the report here")
    ap.add_argument("--txt", help="write a short summary here")
    ap.add_argument("--details", action="store_true", help="keep every case's outcome in the JSON report")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        worker()
        return 0
    from kvq_cli.eval.machine import cpu_name, machine_summary
    from kvq_cli.gguf.write import atomic_output

    if a.base:
        base = Path(a.base)
    else:
        Path(a.base_dir).mkdir(parents=True, exist_ok=True)
        base = build_base(Path(a.base_dir))
    t0 = time.time()
    done = [0]

    def progress(rec):
        done[0] += 1
        bad = ", ".join(f"{p}: {rec[p]['status']}" for p in PATHS if rec[p]["status"] in ("crash", "unclean"))
        if bad or done[0] % 50 == 0:
            print(f"[{done[0]}/{a.cases} {time.time() - t0:.0f}s] case {rec['case']} {rec['mutation']}"
                  + (f"  <-- {bad}" if bad else ""), file=sys.stderr)

    report = run_fuzz(base, cases=a.cases, seed=a.seed, workers=a.workers, keep=Path(a.keep) if a.keep else None,
                      progress=progress)
    cmd = "python scripts/fuzz_gguf.py " + " ".join(sys.argv[1:])
    report = {"command": cmd, "date": subprocess.run(["date", "-u"], capture_output=True, text=True).stdout.strip(),
              "cpu": cpu_name(), "machine": machine_summary(), "seed": a.seed, "cases": a.cases,
              "seconds": round(time.time() - t0, 1), "base": base.name, "base_dims": TINY, **report}
    if not a.details:
        report.pop("case_results")
    if a.json:
        with atomic_output(a.json) as tmp:
            tmp.write_text(json.dumps(report, indent=1) + "\n")
    if a.txt:
        with atomic_output(a.txt) as tmp:
            tmp.write_text(text_summary(report))
    sys.stdout.write(text_summary(report))
    bad = sum(c["crashes"] + c["unclean"] for c in report["paths"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
