"""Every table the CLI prints, in one place (rich on stdout; plain width when piped)."""
from __future__ import annotations

from typing import Any


def _out(width: int | None = None):
    from rich.console import Console

    out = Console()
    return out if out.is_terminal or width is None else Console(width=width)


def _table(title: str, cols: list[str], left: tuple[str, ...] = (), **kw):
    from rich.table import Table

    t = Table(title=title, **kw)
    for c in cols:
        t.add_column(c, justify="left" if c in left else "right", no_wrap=c in left)
    return t


def models_table(rows: list[dict[str, Any]]) -> None:
    """`kvq models`."""
    t = _table("kvq models", ["alias", "hub repo", "params", "status"], left=("alias", "hub repo", "params", "status"))
    for r in rows:
        t.add_row(r["alias"], r["repo_id"], r["params"], r["status"])
    _out().print(t)


def controller_text(c: dict[str, Any] | None) -> str:
    """One line about an embedded controller (models.inspect's summary)."""
    if c is None:
        return "none"
    if "error" in c:
        return f"invalid: {c['error']}"
    return (f"v{c['version']}, features {', '.join(c['features'])}; precisions {c['precisions']} bits; "
            f"w1 {c['w1'][0]}x{c['w1'][1]}, w2 {c['w2'][0]}x{c['w2'][1]}; trained for {c['budget_bits']:g} bits, "
            f"per {c.get('granularity', 'token').replace('_', ' and ')}"
            + ("; K centered" if c.get("k_center") else "")
            + (f"; features normalised at run time (prior {c['norm_prior']} rows)" if c.get("norm_prior") else ""))


def inspect_tables(info) -> None:
    """`kvq inspect`: a summary, then every metadata key."""
    from rich.table import Table

    out = _out()
    d = info.dims
    summary = Table(title=f"{info.path}", show_header=False)
    for k, v in [("architecture", info.architecture), ("name", info.name),
                 ("size", f"{info.size_bytes / 2**20:.1f} MiB"), ("gguf version", info.gguf_version),
                 ("layers", d.n_layer), ("embedding", d.n_embd),
                 ("heads / kv heads", f"{d.n_head} / {d.n_head_kv}"), ("head dim", d.head_dim),
                 ("train context", d.n_ctx_train), ("vocab", d.n_vocab),
                 ("KV elems / token", d.kv_elems_per_token),
                 ("tensors", f"{info.n_tensors} ({', '.join(f'{k}: {v}' for k, v in info.tensor_types.items())})"),
                 ("kvq controller", controller_text(info.controller)),
                 ("loads", "yes" if not info.problems else f"no: {info.problems[0]}"
                  + (f" (+{len(info.problems) - 1} more)" if len(info.problems) > 1 else ""))]:
        summary.add_row(k, str(v))
    out.print(summary)
    meta = Table(title="metadata")
    meta.add_column("key")
    meta.add_column("value", overflow="fold")
    for k, v in {**info.metadata, **info.kvq}.items():
        text = str(v)
        meta.add_row(k, text if len(text) <= 120 else text[:117] + "...")
    out.print(meta)


def bench_table(records, title: str, *, baselines: list[str] | None, roofline: bool) -> None:
    """`kvq bench`: one row per (policy, context)."""
    cols = ["kv", "ctx", "bits", "KV MiB", "prefill t/s", "decode t/s", "ms/tok", "attn ms", "policy %"]
    if baselines:
        cols += ["decode ×", "prefill ×"]
    if roofline:
        cols += ["MB/tok", "bound t/s", "% of bound", "attn × bound"]
    t = _table(title, cols, left=("kv",))
    for r in records:
        row = [r.kv, str(r.ctx), f"{r.bits_per_elem:.2f}", f"{r.kv_bytes / 2**20:.2f}", f"{r.prefill_tok_s:.1f}",
               f"{r.decode_tok_s:.2f}", f"{r.decode_ms_per_tok:.1f}", f"{r.attn_ms_per_tok:.1f}",
               f"{100 * r.policy_share:.1f}"]
        if baselines:
            row += [f"{r.decode_vs:.2f}", f"{r.prefill_vs:.2f}"]
        if roofline:
            ab = r.attn_vs_bound
            row += [f"{r.bytes_per_token / 1e6:.0f}", f"{r.bound_tok_s:.1f}", f"{100 * r.bound_frac:.0f}",
                    f"{ab:.1f}" if ab is not None else "-"]
        t.add_row(*row)
    out = _out(200)
    out.print(t)
    if baselines:
        out.print(f"ratios: against the fastest of {', '.join(baselines)} at each context, same run")


def _ci(x, ci, pct: bool = True) -> str:
    """value±half-width of its 95% interval (the JSON keeps the exact bounds)."""
    if x is None:
        return "-"
    k, d = (100, 1) if pct else (1, 4)
    return f"{k * x:.{d}f}±{k * (ci[1] - ci[0]) / 2:.{d}f}" if ci else f"{k * x:.{d}f}"


def eval_table(records, title: str) -> None:
    """`kvq eval`: one row per (task, policy)."""
    t = _table(title, ["task", "kv", "n", "bits", "acc %", "acc_norm %", "Δacc pt", "Δacc_norm pt", "ppl", "KL"],
               left=("task", "kv"))
    for r in records:
        # a policy named NAME@B that held more than B + 0.1 bits after some item (chunk) says so
        name = f"{r.kv} (held {r.bits_max:.2f})" if r.over_budget else r.kv
        t.add_row(r.task, name, str(r.n), f"{r.bits_per_elem:.2f}" if r.bits_per_elem is not None else "-",
                  _ci(r.acc, r.acc_ci95), _ci(r.acc_norm, r.acc_norm_ci95),
                  _ci(r.diff_acc, r.diff_acc_ci95), _ci(r.diff_acc_norm, r.diff_acc_norm_ci95),
                  f"{r.ppl:.3f}" if r.ppl is not None else "-", _ci(r.kl, r.kl_ci95, pct=False))
    _out(160).print(t)


def train_tables(report, title: str) -> None:
    """`kvq train`: held-out quality of the fit, and feature importance."""
    t = _table(title, ["held out", "value"], left=("held out",))
    for name, value in (("agreement with oracle labels", f"{100 * report.val_acc:.1f}%"),
                        ("bits/row: labels / controller", f"{report.label_bits:.2f} / {report.val_bits:.2f}"),
                        ("damage: oracle (labels)", f"{report.oracle_damage:.3g}"),
                        ("damage: oracle, controller's bits", f"{report.oracle_damage_same_bits:.3g}"),
                        ("damage: controller", f"{report.val_damage:.3g}"),
                        ("damage: static mix, same bits", f"{report.static_damage:.3g}")):
        t.add_row(name, value)
    out = _out()
    out.print(t)
    imp = _table(f"feature importance ({report.importance_metric})", ["feature", "Δ damage"], left=("feature",))
    for name, v in sorted(report.importance.items(), key=lambda kv: -kv[1]):
        imp.add_row(name, f"{v:+.3f}")
    out.print(imp)
