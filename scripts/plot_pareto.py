"""Draw KL-vs-bits and perplexity-vs-bits Pareto plots from `kvq eval --task wikitext2 --json` files.

    python scripts/plot_pareto.py A.json [B.json ...] OUT.png
Every family of the first file is drawn; of the second and later files only the adaptive rows,
labelled by the file's name ("adaptive (pareto_per_token)"). Rule, adaptive and oracle records
of K-centered runs (`k_center` true) are labelled "... K centered".
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def family(r: dict, src: str | None) -> str:
    name = r["kv"].split("@")[0]
    if name.startswith("stock-"):
        return "stock llama.cpp"
    if name in ("f16", "q8", "q4", "k4v2", "q2"):
        return "kvq static" + (", K centered" if r.get("k_center") else "")
    name += ", K centered" if r.get("k_center") else ""
    return f"{name} ({os.path.splitext(os.path.basename(src))[0]})" if src else name


def main(srcs, dst):
    points = {}
    for i, src in enumerate(srcs):
        if not os.path.exists(src):
            print(f"plot_pareto: skipping missing {src}", file=sys.stderr)
            continue
        for r in json.load(open(src)):
            if r["task"] != "wikitext2" or r.get("kl") is None or (i and not r["kv"].startswith("adaptive")):
                continue
            points.setdefault(family(r, src if i else None), []).append((r["bits_per_elem"], r["kl"], r["ppl"], r["kv"]))
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for fam, pts in sorted(points.items()):
        pts.sort()
        x = [p[0] for p in pts]
        style = "o--" if fam in ("kvq static", "stock llama.cpp") else "o-"
        for ax, j in ((axes[0], 1), (axes[1], 2)):
            ax.plot(x, [p[j] for p in pts], style, label=fam)
            for p in pts:
                ax.annotate(p[3], (p[0], p[j]), fontsize=6, alpha=0.7)
    axes[0].set_yscale("log")
    axes[0].set_ylabel("mean KL vs stock f16 (wikitext-2 test)")
    axes[1].set_yscale("log")
    axes[1].set_ylabel("perplexity")
    for ax in axes:
        ax.set_xlabel("effective bits per KV element (window and scales included)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("SmolLM2-135M-Instruct Q4_1: KV policies on wikitext-2, 2048-token chunks, 8,192 scored tokens")
    fig.tight_layout()
    fig.savefig(dst, dpi=110)


if __name__ == "__main__":
    main(sys.argv[1:-1], sys.argv[-1])
