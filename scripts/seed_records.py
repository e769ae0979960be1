"""Seed a `kvq eval --json` file with the complete records of the controller-independent policies.

    python scripts/seed_records.py SRC.json DST.json {mc,wikitext2} [--except KV,...]

A run that includes a mixed-precision policy (adaptive, rule, oracle) evaluates the GGUF copy with
the shipped controller embedded, whose file name (with the controller's hash) is part of each
record's resume key. The static and stock policies read neither the controller nor its K
centering (which rule and oracle use), so their records in SRC (the same weights, run alone or
with an earlier controller) would not be found by --resume and would be scored again. This
copies SRC's complete records of the static and stock policies, of the multiple-choice tasks or
of wikitext-2, into DST under the current copy's name. DST keeps its
own records of that copy; records of other copies (an earlier controller) are dropped. SRC may
be DST. --except leaves the named static policies out (DST's records of them dropped too), for when
the runtime under them changed (q2 and k4v2 store kvq2: a new kvq2 layout needs them scored again).
Scoring is deterministic: re-running the static policies against the copy gave the same
per-item results on every item compared.
"""
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kvq_cli.models.registry import model_ref, resolve  # noqa: E402
from kvq_cli.runtime.kv import parse_kv  # noqa: E402
from kvq_cli.eval.tasks import MC_TASKS  # noqa: E402

GROUPS = {"mc": set(MC_TASKS), "wikitext2": {"wikitext2"}}
MIXED = ("adaptive", "rule", "assign")   # policies that read the embedded controller or its K centering


def key(r: dict) -> tuple:
    return (r["task"], r["kv"], r["split"], r["ctx"], r["kv_bits"], r["kv_window"])


def main(src: str, dst: str, group: str, skip: frozenset[str] = frozenset()) -> None:
    name = model_ref(resolve(None), [parse_kv("adaptive")]).name
    tasks = GROUPS[group]
    seeds, seeded = [], set()
    for r in json.load(open(src)):
        # a key once: SRC may hold the same policy scored against two copies (identical verdicts)
        if (r["task"] in tasks and r.get("complete") and parse_kv(r["kv"]).kvq not in MIXED
                and r["kv"] not in skip and key(r) not in seeded):
            seeds.append(dict(r, model=name))
            seeded.add(key(r))
    old = json.load(open(dst)) if os.path.exists(dst) else []
    kept = [r for r in old if r["model"] == name and key(r) not in seeded and r["kv"] not in skip]
    dropped = sum(1 for r in old if r["model"] != name and key(r) not in seeded)
    tmp = dst + ".tmp"
    with open(tmp, "w") as f:
        f.write(json.dumps(seeds + kept, indent=1) + "\n")
    os.replace(tmp, dst)
    print(f"seeded {len(seeds)} records of {src} into {dst} as {name} "
          f"({len(kept)} kept, {dropped} of another copy dropped)")


if __name__ == "__main__":
    args = sys.argv[1:]
    skip: frozenset[str] = frozenset()
    if len(args) == 5 and args[3] == "--except" and args[4]:
        skip = frozenset(args[4].split(","))
        args = args[:3]
    if len(args) != 3 or not os.path.isfile(args[0]) or args[2] not in GROUPS:
        sys.exit("usage: seed_records.py SRC.json DST.json {mc,wikitext2} [--except KV,...] (SRC must exist)")
    main(*args, skip)
