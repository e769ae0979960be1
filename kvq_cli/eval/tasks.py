"""Evaluation tasks: read the data files under --data and build lm-eval's zero-shot prompts.

The prompt formats follow lm-evaluation-harness's task definitions (v0.4):
- hellaswag: `preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())`, endings
  preprocessed the same way (lm_eval/tasks/hellaswag/utils.py);
- arc-easy / arc-challenge: "Question: {stem}\\nAnswer:", choices are the answer texts;
- openbookqa: the question stem, choices are the answer texts.
The continuation of every choice is " " + choice (lm-eval's target delimiter), and
acc_norm divides a choice's log-likelihood by len(choice) in characters.
"""
from __future__ import annotations

import gzip
import json
import re
from dataclasses import dataclass
from pathlib import Path

from kvq_cli.errors import BadOption

MC_TASKS = ("hellaswag", "arc-easy", "arc-challenge", "openbookqa")
PPL_TASKS = ("wikitext2",)
ALL_TASKS = MC_TASKS + PPL_TASKS
SPLITS = ("test", "dev")

# task -> split -> file under --data. HellaSwag's labelled split is validation (its test
# labels are not public), which lm-eval also reports; it has no dev split here.
_FILES: dict[str, dict[str, str]] = {
    "hellaswag": {"test": "hellaswag/hellaswag_val.jsonl.gz"},
    "arc-easy": {"test": "arc/ARC-Easy-Test.jsonl", "dev": "arc/ARC-Easy-Dev.jsonl"},
    "arc-challenge": {"test": "arc/ARC-Challenge-Test.jsonl", "dev": "arc/ARC-Challenge-Dev.jsonl"},
    "openbookqa": {"test": "openbookqa/test.jsonl", "dev": "openbookqa/dev.jsonl"},
    "wikitext2": {"test": "wikitext2/wiki.test.nonempty-lf.raw"},
}


@dataclass(frozen=True)
class McItem:
    """One multiple-choice item: the context and the choices (without the leading space)."""

    id: str
    context: str
    choices: tuple[str, ...]
    gold: int


def parse_tasks(value: str) -> list[str]:
    """Parse a comma-separated --task list ("all" = every task)."""
    names = [v.strip().lower() for v in value.split(",") if v.strip()]
    if names == ["all"]:
        return list(ALL_TASKS)
    if not names:
        raise BadOption("empty --task list", hint=f"choose from: {', '.join(ALL_TASKS)}")
    for n in names:
        if n not in ALL_TASKS:
            raise BadOption(f"unknown task '{n}'", hint=f"choose from: {', '.join(ALL_TASKS)}")
    return list(dict.fromkeys(names))


def task_file(data_dir: str | Path, task: str, split: str) -> Path:
    """The data file of `task`/`split` under `data_dir`, with a clear error when it is missing."""
    if split not in SPLITS:
        raise BadOption(f"unknown --split '{split}'", hint="choose test or dev")
    files = _FILES[task]
    if split not in files:
        raise BadOption(f"{task} has no {split} split", hint=f"{task} has: {', '.join(files)}")
    path = Path(data_dir) / files[split]
    if not path.is_file():
        raise BadOption(f"{task}: no {files[split]} under {data_dir}",
                        hint="pass --data pointing at the evaluation data dir (see its SOURCES.md)")
    return path


def _hellaswag_preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _read_jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise BadOption(f"{path}: line {n} is not JSON ({e.msg})") from None
    return rows


def _item(task: str, doc: dict) -> McItem:
    if task == "hellaswag":
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return McItem(str(doc.get("ind", "")), _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                      tuple(_hellaswag_preprocess(e) for e in doc["endings"]), int(doc["label"]))
    q = doc["question"]
    labels = [c["label"] for c in q["choices"]]
    texts = tuple(c["text"] for c in q["choices"])
    gold = labels.index(doc["answerKey"].strip())
    if task == "openbookqa":
        return McItem(doc["id"], q["stem"], texts, gold)
    return McItem(doc["id"], f"Question: {q['stem']}\nAnswer:", texts, gold)


def load_mc_task(data_dir: str | Path, task: str, split: str = "test", limit: int | None = None) -> list[McItem]:
    """The first `limit` items of a multiple-choice task, in file order."""
    path = task_file(data_dir, task, split)
    rows = _read_jsonl(path)
    if limit is not None:
        rows = rows[:limit]
    try:
        return [_item(task, r) for r in rows]
    except (KeyError, ValueError, TypeError, AttributeError) as e:
        raise BadOption(f"{path}: not in the expected {task} layout ({type(e).__name__}: {e})") from None


def load_text(data_dir: str | Path, task: str = "wikitext2", split: str = "test") -> str:
    """The raw text of a perplexity task."""
    return task_file(data_dir, task, split).read_text(encoding="utf-8")


def parse_limit(value: str | None, tasks: list[str]) -> int | dict[str, int] | None:
    """--limit N (every multiple-choice task) or task=N,task=N."""
    if value is None:
        return None
    try:
        if "=" not in value:
            n = int(value)
            out: int | dict[str, int] = n
            ns = [n]
        else:
            out = {k.strip().lower(): int(v) for k, v in (kv.split("=", 1) for kv in value.split(",") if kv.strip())}
            ns = list(out.values())
            unknown = [k for k in out if k not in tasks]
            if unknown:
                raise BadOption(f"--limit names tasks not in --task: {', '.join(unknown)}")
    except ValueError:
        raise BadOption(f"--limit takes N or task=N,task=N; got '{value}'") from None
    if min(ns) < 1:
        raise BadOption(f"--limit must be >= 1, got '{value}'")
    return out
