#!/usr/bin/env bash
# Developer tool: regenerate one patch of the series from a pristine and an edited tree.
#   scripts/refresh_patch.sh ORIG_DIR NEW_DIR patches/llama.cpp/000N-name.patch [PATHS...]
# ORIG_DIR/NEW_DIR are sdist roots (the dirs holding pyproject.toml); PATHS limit the diff
# (default: vendor/llama.cpp/src). Timestamps are stripped so the patch is reproducible.
set -euo pipefail
orig=$1 new=$2 out=$3
shift 3
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(vendor/llama.cpp/src)
tmp=$(mktemp)
for p in "${paths[@]}"; do
  diff -ruN "$orig/$p" "$new/$p" | sed -E \
    -e "s#^--- $orig/([^\t]*)(\t.*)?#--- a/\1#" \
    -e "s#^\+\+\+ $new/([^\t]*)(\t.*)?#+++ b/\1#" \
    -e "s#^diff -ruN $orig/(\S*) $new/(\S*)#diff -ruN a/\1 b/\2#" >> "$tmp" || true
done
mv "$tmp" "$out"
echo "wrote $out ($(grep -c '^+++ ' "$out") files)" >&2
