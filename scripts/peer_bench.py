#!/usr/bin/env python3
"""Decode speed of kvq beside ik_llama.cpp (the strongest CPU peer): same GGUF, same contexts, one run.

Usage: .venv/bin/python scripts/peer_bench.py [--ik-src GITDIR] [--model M] [--ctx 8192] [--gen 64]
       [--repeats 3] [--kv adaptive@3.5,stock-f16] [--ik-cache q4_0,q8_0,f16] [--threads N] [--data DIR]
       [--cache-dir ~/.cache/kvq-peer] [--json OUT]

The peer: ik_llama.cpp at IK_COMMIT, the HEAD of `main` in the snapshot of github.com/ikawrakow/ik_llama.cpp
fetched on 2026-12-07 (a commit of 2026-08-15, "Fix Qwen35+ MTP (#2322)"). There is no network here, so
--ik-src names a git dir or clone holding that commit; its tree is exported (export_source) into --cache-dir,
outside the repo and not part of CI, and built there once: Release, CPU only, -march=native without AMX
(the flags kvq's runtime gets, scripts/build_runtime.py), static, no curl, target llama-bench only, under
`nice -n 19` with -j2. Later runs reuse the binary and need no --ik-src.

For each context C, minutes apart on the same machine: ik's `llama-bench -gp C-gen,gen -fa 1` once per
--ik-cache type (K and V both; "K/V" for a pair), which times the decode of gen tokens after a prompt of
C-gen random tokens, then `kvq bench --ctx C --gen gen`, which prefills C-gen tokens of real text (--data,
else the stdlib's docstrings: adaptive's choices, and so its speed, depend on the text; no stock cache's
speed does) and decodes gen. Both engines load the same GGUF file: kvq resolves --model (default: the
embedded SmolLM2-135M-Instruct Q4_1 GGUF, run with the controller kvq ships for it, not written into the
file) and ik gets that file's path (ik ignores the kvq.* keys of a GGUF with an embedded controller). The
table gives each row's decode tokens/s over ik's fastest cache at that context.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from build_runtime import CMAKE_DEFINES  # noqa: E402  (scripts/ is on sys.path: this file's directory)

from kvq_cli.errors import KvqError  # noqa: E402
from kvq_cli.eval.machine import cpu_name, machine_summary, simd_level  # noqa: E402
from kvq_cli.models.registry import resolve  # noqa: E402

IK_COMMIT = "8337e4cd3861406fc04e0854b1409cd1b027fbc9"
IK = "ik_llama.cpp"
CMAKE_ARGS = ["-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_CUDA=OFF", "-DLLAMA_CURL=OFF",
              "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF",
              *[f"-D{k}={v}" for k, v in CMAKE_DEFINES.items()]]
LOG_TAIL = 20   # build-log lines shown when the build fails


class PeerError(Exception):
    """A failure the user can act on: printed as one message, exit code 2."""


def note(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def export_source(ik_src: str | None, dest: Path) -> None:
    """Write ik_llama.cpp's tree at IK_COMMIT from the git dir (or clone) `ik_src` into `dest`.

    Through a scratch index (read-tree + checkout-index) rather than `git archive`, which stops at the
    first blob a git dir lacks: partial mirrors (such as the /work/.mirror snapshots) leave out a few large
    files (test vocabularies, web UI bundles) that llama-bench's build never reads. Those are named and
    skipped; any other failure is an error.
    """
    if ik_src is None:
        raise PeerError(f"{dest} does not exist yet: pass --ik-src GITDIR, a git dir or clone of {IK} "
                        f"holding commit {IK_COMMIT}")
    git_dir = Path(ik_src).expanduser()
    if (git_dir / ".git").exists():
        git_dir = git_dir / ".git"
    if subprocess.run(["git", f"--git-dir={git_dir}", "cat-file", "-e", f"{IK_COMMIT}^{{commit}}"],
                      capture_output=True).returncode:
        raise PeerError(f"--ik-src {ik_src} is not a git dir holding {IK} commit {IK_COMMIT}")
    tmp = dest.with_name(dest.name + ".tmp")   # renamed into place once complete
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    git = ["git", f"--git-dir={git_dir}", f"--work-tree={tmp}"]
    env = {**os.environ, "GIT_INDEX_FILE": str(dest.with_name(dest.name + ".index"))}
    proc = subprocess.run([*git, "read-tree", IK_COMMIT], env=env, capture_output=True, text=True)
    if not proc.returncode:
        proc = subprocess.run([*git, "checkout-index", "--all", "--force"], env=env, capture_output=True, text=True)
        Path(env["GIT_INDEX_FILE"]).unlink()
    errors = proc.stderr.strip().splitlines()
    missing = [e.split(" of ", 1)[1].split(" (")[0] for e in errors if "unable to read sha1 file of" in e]
    if len(missing) < len(errors) or (proc.returncode and not missing):
        last = errors[-1] if errors else f"git exit {proc.returncode}"
        raise PeerError(f"could not export {IK} {IK_COMMIT} from {git_dir}: {last}")
    if missing:
        note(f"{git_dir} lacks {len(missing)} files of {IK_COMMIT[:12]}, exported without them: {', '.join(missing)}")
    tmp.rename(dest)


def ik_bench_binary(cache_dir: Path, ik_src: str | None) -> Path:
    """ik's llama-bench at IK_COMMIT under `cache_dir`, exported and built on first use."""
    src = cache_dir / f"{IK}-{IK_COMMIT[:7]}"
    binary = src / "build" / "bin" / "llama-bench"
    if binary.is_file():
        return binary
    if not src.is_dir():
        export_source(ik_src, src)
    log = src / "build.log"
    note(f"building {IK} {IK_COMMIT[:12]} in {src} (nice -n 19, -j2; log: {log})")
    start = time.monotonic()
    with log.open("w") as out:
        for step in (["cmake", "-S", str(src), "-B", str(src / "build"), *CMAKE_ARGS],
                     ["cmake", "--build", str(src / "build"), "--target", "llama-bench", "-j", "2"]):
            out.write(f"$ {shlex.join(step)}\n")
            out.flush()
            code = subprocess.run(["nice", "-n", "19", *step], stdout=out, stderr=subprocess.STDOUT).returncode
            if code:
                tail = "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])
                raise PeerError(f"building {IK} failed (exit {code}); last lines of {log}:\n{tail}")
    note(f"built {binary} in {time.monotonic() - start:.0f} s")
    return binary


def run_ik(binary: Path, model: Path, ctx: int, gen: int, cache: str, threads: int, repeats: int) -> dict:
    """One ik llama-bench decode measurement (flash attention, K/V cache types `cache`) as a row; the median
    over repeats, as kvq bench's records (ik's own avg_ts is the mean)."""
    k, _, v = cache.partition("/")
    # -p 0 -n 0: only the -gp test (its defaults would add pp512 and tg128)
    cmd = [str(binary), "-m", str(model), "-p", "0", "-n", "0", "-gp", f"{ctx - gen},{gen}", "-t", str(threads),
           "-fa", "1", "-ctk", k, "-ctv", v or k, "-r", str(repeats), "-o", "json"]
    note(f"{IK} {cache} at {ctx}: {shlex.join(cmd)}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise PeerError(f"{IK} llama-bench failed (exit {proc.returncode}) with {cache} at {ctx}: {last}")
    (record,) = json.loads(proc.stdout)
    if (record["type_k"], record["type_v"]) != (k, v or k):   # it runs f16 for a type name it does not know
        raise PeerError(f"{IK} llama-bench ran {record['type_k']}/{record['type_v']} for --ik-cache {cache}: "
                        "not a cache type it knows")
    return {"engine": IK, "cache": cache, "ctx": ctx, "n_prompt": record["n_prompt"], "n_gen": record["n_gen"],
            "threads": record["n_threads"], "decode_tok_s": statistics.median(record["samples_ts"]),
            "decode_tok_s_runs": record["samples_ts"], "command": shlex.join(cmd), "record": record}


def run_kvq(model: str | None, ctx: int, gen: int, kv: str, threads: int, repeats: int, data: str | None) -> list:
    """`kvq bench` at one context (its table goes to stderr), as rows."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "bench.json"
        cmd = [sys.executable, "-m", "kvq_cli", "bench", *([model] if model else []), "--kv", kv,
               "--ctx", str(ctx), "--gen", str(gen), "--repeats", str(repeats), "--threads", str(threads),
               *(["--data", data] if data else []), "--json", str(out)]
        note(f"kvq at {ctx}: {shlex.join(cmd)}")
        code = subprocess.run(cmd, stdout=sys.stderr).returncode
        if code:
            raise PeerError(f"kvq bench failed (exit {code}) at {ctx}; its output is above")
        records = json.loads(out.read_text())
    return [{"engine": "kvq", "cache": r["kv"], "ctx": ctx, "n_prompt": r["n_prefill"], "n_gen": r["n_gen"],
             "threads": r["threads"], "decode_tok_s": r["decode_tok_s"], "decode_tok_s_runs": r["decode_tok_s_runs"],
             "command": shlex.join(cmd), "record": r} for r in records]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ik-src", default=None, help=f"git dir or clone of {IK} holding {IK_COMMIT[:12]} "
                    "(needed until the binary is built)")
    ap.add_argument("--model", default=None, help="kvq model: alias or .gguf path (default: the embedded "
                    "SmolLM2-135M-Instruct Q4_1 GGUF); ik loads the same file")
    ap.add_argument("--ctx", default="8192", help="comma-separated contexts")
    ap.add_argument("--gen", type=int, default=64, help="tokens decoded after a ctx-gen prompt")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--kv", default="adaptive@3.5,stock-f16", help="kvq policies (kvq bench --kv)")
    ap.add_argument("--ik-cache", default="q4_0,q8_0,f16", help="ik K+V cache types, comma-separated "
                    "(K/V for different ones), all with flash attention")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--data", default=None, help="evaluation data dir for kvq bench's prefill text")
    ap.add_argument("--cache-dir", default="~/.cache/kvq-peer", help=f"where {IK}'s source and build live")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    try:
        contexts = [int(c) for c in a.ctx.split(",")]
    except ValueError:
        ap.error(f"--ctx {a.ctx}: expected comma-separated integers")
    if any(c <= a.gen for c in contexts) or a.gen < 1 or a.repeats < 1:
        ap.error("each --ctx must exceed --gen, and --gen and --repeats must be >= 1")

    try:
        model = resolve(a.model).path
        if not model.is_file():
            raise PeerError(f"--model {a.model}: no such file")
        binary = ik_bench_binary(Path(a.cache_dir).expanduser(), a.ik_src)
        rows = []
        for ctx in contexts:
            rows += [run_ik(binary, model, ctx, a.gen, c, a.threads, a.repeats) for c in a.ik_cache.split(",")]
            rows += run_kvq(a.model, ctx, a.gen, a.kv, a.threads, a.repeats, a.data)
    except KvqError as e:
        print(f"peer_bench: {e.one_line()}", file=sys.stderr)
        return 2
    except PeerError as e:
        print(f"peer_bench: {e}", file=sys.stderr)
        return 2

    for ctx in contexts:
        fastest = max(r["decode_tok_s"] for r in rows if r["engine"] == IK and r["ctx"] == ctx)
        for r in rows:
            if r["ctx"] == ctx:
                r["vs_ik_fastest"] = r["decode_tok_s"] / fastest
    cmd = "python scripts/peer_bench.py " + shlex.join(sys.argv[1:])
    date = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    print(f"# {cmd}\n# {date}, {machine_summary()}, {simd_level()}; {IK} {IK_COMMIT[:12]}; {model.name}; "
          f"{a.threads} threads, decode of {a.gen} tokens after ctx-{a.gen}, median of {a.repeats}")
    print("| engine | cache | context | decode tok/s | x ik fastest |\n|---|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['cache']} | {r['ctx']} | {r['decode_tok_s']:.1f} | {r['vs_ik_fastest']:.2f} |")
    if a.json:
        Path(a.json).write_text(json.dumps({
            "command": cmd, "date": date, "cpu": cpu_name(), "simd": simd_level(), "machine": machine_summary(),
            "ik_commit": IK_COMMIT, "model": str(model), "threads": a.threads, "gen": a.gen, "repeats": a.repeats,
            "ik_commands": [r["command"] for r in rows if r["engine"] == IK],
            "kvq_commands": list(dict.fromkeys(r["command"] for r in rows if r["engine"] == "kvq")),
            "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
