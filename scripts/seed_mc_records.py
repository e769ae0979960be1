"""Seed a `kvq eval --json` file with the complete static-policy records of another one.

    python scripts/seed_mc_records.py SRC.json DST.json

A run that includes `adaptive` evaluates the GGUF copy with the controller embedded, whose file
name is part of each record's resume key, so the static records of SRC (the same weights, run
without adaptive) would not be found by --resume and would be scored again. This copies SRC's
complete records of the static policies (stock-*, f16, q8, q4, q2) into DST under that copy's
name, keeping DST's own records of other policies. The scoring is deterministic: re-running the
static policies against the copy gave the same per-item results on every item compared.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvq_cli.models import gguf_for, resolve  # noqa: E402
from kvq_cli.runtime.kv import parse_kv  # noqa: E402

STATIC = {"stock-f16", "f16", "q8", "q4", "q2"}


def main(src: str, dst: str) -> None:
    name = gguf_for(resolve(None), [parse_kv("adaptive")]).name
    seeds = []
    for r in json.load(open(src)):
        if r["kv"] in STATIC and r.get("complete") and r["task"] != "wikitext2":
            seeds.append(dict(r, model=name))
    seeded = {(r["task"], r["kv"]) for r in seeds}
    kept = [r for r in (json.load(open(dst)) if os.path.exists(dst) else []) if (r["task"], r["kv"]) not in seeded]
    tmp = dst + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(seeds + kept, indent=1) + "\n")
    os.replace(tmp, dst)
    print(f"seeded {len(seeds)} records of {src} into {dst} as {name} ({len(kept)} kept)")


if __name__ == "__main__":
    if len(sys.argv) != 3 or not os.path.isfile(sys.argv[1]):
        sys.exit("usage: seed_mc_records.py SRC.json DST.json (SRC must exist)")
    main(*sys.argv[1:])
