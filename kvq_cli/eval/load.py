"""A bounded load run against llama-server: clients x requests of fixed prompts, one server per cache,
side by side in one run (`scripts/serve_load.py`).

Every client sends the same long document with its own question (a shared prefix each slot keeps
cached, as a retrieval app would), greedy, a fixed number of tokens with end-of-text ignored, so
every cache decodes the same amount at the same context length.
"""
from __future__ import annotations

import json
import threading
import time
import urllib.request
from dataclasses import dataclass, field

from kvq_cli.runtime.engine import ModelRef
from kvq_cli.runtime.kv import KvPolicy
from kvq_cli.runtime.server import ServeConfig, Server


@dataclass
class LoadRecord:
    """One cache under load: requests, failures, throughput, latency, memory."""

    kv: str
    clients: int
    requests: int
    failed: int
    wall_s: float
    completion_tokens: int
    tokens_per_s: float           # completion tokens / wall time, all clients together
    latency_p50_s: float
    latency_p95_s: float
    server_peak_rss_mib: float
    kv_mib: float                 # stock: llama.cpp's KV cache; kvq: its cap (Server.kv_mib)
    errors: list[str] = field(default_factory=list)


def post_json(url: str, body: dict, timeout: float) -> dict:
    """POST a JSON body, return the JSON answer."""
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def fit_prompt(url: str, text: str, n_tokens: int, timeout: float = 60.0) -> str:
    """The first n_tokens tokens of `text` as text, cut with the server's own tokenizer."""
    toks = post_json(url + "/tokenize", {"content": text}, timeout)["tokens"]
    if len(toks) < n_tokens:
        raise ValueError(f"the prompt text holds {len(toks)} tokens, fewer than {n_tokens}")
    return post_json(url + "/detokenize", {"tokens": toks[:n_tokens]}, timeout)["content"]


def percentile(values: list[float], q: float) -> float:
    """The q-quantile (0..1) by linear interpolation between closest ranks."""
    if not values:
        return float("nan")
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (v[hi] - v[lo]) * (pos - lo)


def drive(url: str, prompts: list[str], requests: int, max_tokens: int, timeout: float = 600.0):
    """One thread per prompt (a client), each sending `requests` completions in turn; returns latencies,
    completion tokens, errors and the wall time."""
    lat: list[float] = []
    done = [0]
    errors: list[str] = []
    lock = threading.Lock()

    def client(prompt: str) -> None:
        for _ in range(requests):
            t0 = time.monotonic()
            try:
                r = post_json(url + "/completion", {"prompt": prompt, "n_predict": max_tokens, "temperature": 0.0,
                                                    "ignore_eos": True, "cache_prompt": True}, timeout)
                n = int(r.get("tokens_predicted", 0))
                if n != max_tokens:
                    raise RuntimeError(f"{n} tokens predicted, {max_tokens} asked")
            except Exception as e:  # a failed request is counted, not fatal
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                lat.append(time.monotonic() - t0)
                done[0] += n

    threads = [threading.Thread(target=client, args=(p,)) for p in prompts]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, done[0], errors, time.monotonic() - t0


def run_load(model: ModelRef, policy: KvPolicy, prompts: list[str], *, parallel: int, ctx: int, requests: int,
             max_tokens: int, threads: int | None = None) -> LoadRecord:
    """Start llama-server with this cache, warm every slot's prefix, drive the clients, stop it."""
    cfg = ServeConfig(policy=policy, parallel=parallel, ctx=ctx, port=0, threads=threads)
    with Server(model, cfg) as srv:
        drive(srv.url, prompts[:parallel], 1, 1)   # every slot prefills the shared document once
        lat, n, errors, wall = drive(srv.url, prompts, requests, max_tokens)
        mem = srv.memory_mib()
        kv_mib = srv.kv_mib()
        alive = srv.alive()
    if not alive:
        errors.append("llama-server died during the run")
    return LoadRecord(kv=policy.name, clients=len(prompts), requests=len(prompts) * requests, failed=len(errors),
                      wall_s=wall, completion_tokens=n, tokens_per_s=n / wall if wall > 0 else 0.0,
                      latency_p50_s=percentile(lat, 0.5), latency_p95_s=percentile(lat, 0.95),
                      server_peak_rss_mib=mem.get("peak_rss", float("nan")), kv_mib=kv_mib, errors=errors[:5])
