#!/usr/bin/env bash
# Developer tool: regenerate one patch of the series from a pristine and an edited tree.
#   scripts/refresh_patch.sh ORIG_DIR NEW_DIR patches/llama.cpp/000N-name.patch [PATHS...]
# ORIG_DIR/NEW_DIR are sdist roots (the dirs holding pyproject.toml); PATHS limit the diff
# (default: vendor/llama.cpp/src). Timestamps are stripped so the patch is reproducible.
#
# New source files are not patched in: they live as plain files in patches/llama.cpp/src/
# (edit them there; scripts/build_runtime.py copies them into vendor/llama.cpp/src/). The diff
# leaves out every file of that name, so a NEW_DIR holding copies of them only yields the
# hooks in upstream files. Workflow for a hook: ORIG_DIR = sdist + the patches before this
# one, NEW_DIR = a copy with this patch applied, edit NEW_DIR, run this script.
set -euo pipefail
orig=$1 new=$2 out=$3
shift 3
paths=("$@")
[ ${#paths[@]} -gt 0 ] || paths=(vendor/llama.cpp/src)
src_dir="$(cd "$(dirname "$0")/.." && pwd)/patches/llama.cpp/src"
excludes=()
if [ -d "$src_dir" ]; then
  while IFS= read -r f; do excludes+=(-x "$(basename "$f")"); done < <(find "$src_dir" -type f)
fi
tmp=$(mktemp)
for p in "${paths[@]}"; do
  diff -ruN "${excludes[@]}" "$orig/$p" "$new/$p" | sed -E \
    -e "s#^--- $orig/([^\t]*)(\t.*)?#--- a/\1#" \
    -e "s#^\+\+\+ $new/([^\t]*)(\t.*)?#+++ b/\1#" \
    -e "s#^diff -ruN( -x \S+)* $orig/(\S*) $new/(\S*)#diff -ruN a/\2 b/\3#" >> "$tmp" || true
done
mv "$tmp" "$out"
echo "wrote $out ($(grep -c '^+++ ' "$out") files)" >&2
