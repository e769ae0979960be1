"""The codebase's shape: no import cycles, small source files, a hooks-only patch, and the
constants the C runtime and the Python package both define kept equal (one parity test)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from kvq_cli.controller.spec import EFF_BITS_OF, KNOWN_FEATURES, PRECISION_BITS
from kvq_cli.gguf.keys import Controller
from kvq_cli.runtime import _lib as L

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "kvq_cli"
NATIVE = ROOT / "patches" / "llama.cpp"
MAX_LINES = 700


def _modules() -> dict[str, Path]:
    out = {}
    for f in PKG.rglob("*.py"):
        rel = f.relative_to(ROOT).with_suffix("")
        out[".".join(rel.parts[:-1] if rel.name == "__init__" else rel.parts)] = f
    return out


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """Package modules `name` imports anywhere in its body (function-level imports included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = name.split(".")[: len(name.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join(parts + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]
        else:
            continue
        out |= {t for t in targets if t in mods and t != name and not name.startswith(t + ".")}
    return out


def test_no_import_cycles():
    mods = _modules()
    graph = {m: _imports(m, f, mods) for m, f in mods.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(v: str) -> None:   # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                cycles.append(sorted(comp))

    for m in sorted(graph):
        if m not in index:
            visit(m)
    assert not cycles, f"import cycles: {cycles}"


def test_source_files_are_small():
    files = [*PKG.rglob("*.py"), *(NATIVE / "src").glob("*"), *(ROOT / "scripts").glob("*.py")]
    long = {str(f.relative_to(ROOT)): n for f in files if (n := len(f.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert not long, f"over {MAX_LINES} lines: {long}"


def test_native_code_is_source_files_and_the_patch_only_hooks():
    sources = sorted(p.name for p in (NATIVE / "src").glob("llama-kvq*"))
    assert "llama-kvq.h" in sources and len([s for s in sources if s.endswith(".cpp")]) >= 5
    hooks = (NATIVE / "0002-kvq-mixed-precision-kv.patch").read_text()
    assert len(hooks.splitlines()) <= 300   # hooks only: the runtime is in src/
    touched = re.findall(r"^\+\+\+ b/(\S+)", hooks, re.M)
    assert touched and not any(Path(t).name.startswith("llama-kvq") for t in touched)


def _header() -> str:
    return (NATIVE / "src" / "llama-kvq.h").read_text()


def test_gguf_keys_match_the_c_header():
    c_keys = set(re.findall(r'#define LLAMA_KVQ_KEY_\w+\s+"([^"]+)"', _header()))
    py_keys = {v for k, v in vars(Controller).items() if k.isupper()}
    assert c_keys == py_keys
    version = re.search(r"#define LLAMA_KVQ_CONTROLLER_VERSION (\d+)", _header())
    from kvq_cli.controller.spec import CONTROLLER_VERSION

    assert int(version.group(1)) == CONTROLLER_VERSION


def test_features_pools_and_bits_match_the_c_sources():
    src = "\n".join(p.read_text() for p in (NATIVE / "src").glob("*.cpp"))
    names = re.search(r"KVQ_FEATURE_NAMES\[LLAMA_KVQ_N_FEATURES\] = \{([^}]*)\}", src).group(1)
    assert tuple(re.findall(r'"(\w+)"', names)) == KNOWN_FEATURES
    assert int(re.search(r"#define LLAMA_KVQ_N_FEATURES (\d+)", _header()).group(1)) == len(KNOWN_FEATURES)
    impl = (NATIVE / "src" / "llama-kvq-impl.h").read_text()
    eff = [float(x.strip().rstrip("f")) for x in re.search(r"KVQ_EFF_BITS_BY_BITS\[17\] = \{([^}]*)\}", impl).group(1).split(",")]
    assert {b: eff[b] for b in PRECISION_BITS} == pytest.approx(EFF_BITS_OF)
    pools = re.search(r"enum llama_kvq_prec \{(.*?)\};", _header(), re.S).group(1)
    values = dict(re.findall(r"LLAMA_KVQ_(\w+)\s*=\s*(\d+)", pools))
    assert int(values["N_POOLS"]) == L.N_POOLS
    order = ["WINDOW", "F16", "Q8", "Q4", "K4V2", "Q2", "DROP"]
    assert [int(values[k]) for k in order] == list(range(L.N_POOLS)) and len(L.POOL_NAMES) == len(order)
    policies = dict(re.findall(r"LLAMA_KVQ_POLICY_(\w+)\s*=\s*(\d+)", _header()))
    assert [int(policies[k]) for k in ("STATIC", "RULE", "LEARNED", "ASSIGN")] == \
        [L.POLICY_STATIC, L.POLICY_RULE, L.POLICY_LEARNED, L.POLICY_ASSIGN]


def test_params_struct_fields_match_the_c_header():
    body = re.search(r"struct llama_kvq_params \{(.*?)\};", _header(), re.S).group(1)
    c_fields = re.findall(r"^\s*(?:const\s+)?\w+\s*\*?\s*(\w+);", body, re.M)
    assert c_fields == [name for name, _ in L.KvqParams._fields_]
    body = re.search(r"struct llama_kvq_stats \{(.*?)\};", _header(), re.S).group(1)
    c_fields = re.findall(r"^\s*\w+\s+(\w+)(?:\[\w+\])?;", body, re.M)
    assert c_fields == [name for name, _ in L.KvqStats._fields_]
