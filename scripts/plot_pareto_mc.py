"""Multiple-choice accuracy vs effective bits from a `kvq eval --json` file, and its table.

    python scripts/plot_pareto_mc.py RESULTS.json OUT.png

Draws acc_norm vs bits/element for each task and for the four-task average, and prints a
markdown table: per task acc_norm (complete tasks only), the average over the tasks the
policy has complete, and the paired difference of that average vs the reference policy on
the same tasks, with a bootstrap 95% interval (items resampled within each task, tasks
weighted equally), and the mean over those tasks of the KL vs the reference on every choice
token where the records have it. A policy missing a task is marked with the number of tasks averaged.
The last column counts the items whose acc_norm verdict differs from the reference's, right
where the reference was wrong (+) and wrong where it was right (-), over the same tasks: a
perturbation that only adds noise changes items both ways about equally.
"""
import json
import sys

import numpy as np

TASKS = ["hellaswag", "arc-easy", "arc-challenge", "openbookqa"]


def family(rec: dict) -> str:
    from plot_pareto import family as wikitext_family  # the same legend families as the KL plot

    return wikitext_family(rec, None)


def correct(r) -> np.ndarray:
    return np.frombuffer(r["state"]["correct_norm"].encode("ascii"), dtype=np.uint8).astype(np.float64) - ord("0")


def average_diff(recs, ref_recs, seed=0, n_boot=2000):
    """Mean over recs' tasks of acc_norm - ref acc_norm, and a bootstrap interval resampling items within each task."""
    rng = np.random.default_rng(seed)
    diffs = []
    for t in recs:
        d = correct(recs[t]) - correct(ref_recs[t])
        diffs.append(d)
    point = float(np.mean([d.mean() for d in diffs]))
    boots = np.zeros(n_boot)
    for d in diffs:
        idx = rng.integers(0, len(d), size=(n_boot, len(d)))
        boots += d[idx].mean(1)
    boots /= len(diffs)
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return point, float(lo), float(hi)


def main(src: str, dst: str, ref: str = "f16") -> None:
    by_kv: dict[str, dict] = {}
    for r in json.load(open(src)):
        if r["task"] in TASKS and r.get("complete"):
            by_kv.setdefault(r["kv"], {})[r["task"]] = r
    full = {kv: recs for kv, recs in by_kv.items() if all(t in recs for t in TASKS)}
    if ref not in full:
        sys.exit(f"plot_pareto_mc: the reference {ref} has not got all four tasks complete in {src}")

    def bits(recs):
        # items-weighted mean of the per-item effective bits over the policy's complete tasks
        b = [x for r in recs.values() for x in r["state"]["bits"]]
        return float(np.mean(b))

    rows = sorted(by_kv.items(), key=lambda kv: (-bits(kv[1]), kv[0]))
    print("| KV cache | bits/elem | " + " | ".join(TASKS) + " | average | average − " + ref + " [95% CI] | KL vs " + ref
          + " | items changed vs " + ref + " (+ / −) |")
    print("|---|---|" + "---|" * len(TASKS) + "---|---|---|---|")
    for kv, recs in rows:
        accs = [f"{100 * recs[t]['acc_norm']:.1f}" if t in recs else "-" for t in TASKS]
        avg = f"{100 * np.mean([r['acc_norm'] for r in recs.values()]):.1f}"
        if len(recs) < len(TASKS):
            avg += f" ({len(recs)} task{'s' if len(recs) > 1 else ''})"
        if kv == ref:
            d = "(reference)"
        else:
            p, lo, hi = average_diff(recs, by_kv[ref])
            d = f"{100 * p:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
        kls = [r.get("kl") for r in recs.values()]
        kl = "-" if kv == ref or any(k is None for k in kls) else f"{np.mean(kls):.4f}"
        ch = "-"
        if kv != ref:
            pairs = [(correct(recs[t]), correct(by_kv[ref][t])) for t in recs]
            ch = (f"+{sum(int(((a == 1) & (b == 0)).sum()) for a, b in pairs)}"
                  f" / −{sum(int(((a == 0) & (b == 1)).sum()) for a, b in pairs)}")
        print(f"| {kv} | {bits(recs):.2f} | " + " | ".join(accs) + f" | {avg} | {d} | {kl} | {ch} |")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(22, 4.5))
    # one colour per family in every panel (a family missing from a panel must not shift the others')
    all_fams = sorted({family(next(iter(recs.values()))) for recs in by_kv.values()})
    colour = {f: f"C{i % 10}" for i, f in enumerate(all_fams)}
    for j, t in enumerate(TASKS + ["average"]):
        ax = axes[j]
        fams: dict[str, list] = {}
        for kv, recs in by_kv.items():
            if t == "average":
                if kv not in full:
                    continue
                x, y = bits(full[kv]), float(np.mean([full[kv][u]["acc_norm"] for u in TASKS]))
            elif t in recs:
                x, y = float(np.mean(recs[t]["state"]["bits"])), recs[t]["acc_norm"]
            else:
                continue
            fams.setdefault(family(next(iter(recs.values()))), []).append((x, 100 * y, kv))
        for fam, pts in sorted(fams.items()):
            pts.sort()
            style = "o--" if fam in ("kvq static", "stock llama.cpp") else "o-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=colour[fam])
            for p in pts:
                ax.annotate(p[2], (p[0], p[1]), fontsize=6, alpha=0.7)
        ax.set_title(t)
        ax.set_xlabel("effective bits per KV element")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("acc_norm (%)")
    from matplotlib.lines import Line2D

    axes[-1].legend([Line2D([], [], color=colour[f], marker="o", linestyle="--" if f in ("kvq static", "stock llama.cpp") else "-")
                     for f in all_fams], all_fams, fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct Q4_1: zero-shot multiple-choice accuracy vs KV bits (same items for every policy)")
    fig.tight_layout()
    fig.savefig(dst, dpi=100)


if __name__ == "__main__":
    if len(sys.argv) not in (3, 4):
        sys.exit("usage: plot_pareto_mc.py RESULTS.json OUT.png [REF]")
    main(*sys.argv[1:])
