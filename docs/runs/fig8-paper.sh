#!/usr/bin/env bash
# fig8's paper run on one GPU, in pieces that each fit a 10-minute device call. First the models:
#   bash docs/runs/fig7-paper.sh setup              (qwen2.5-0.5b-instruct; wheels read from $XFER)
# then, as many times as it takes (each call stops cleanly after the profile's time_budget_s):
#   bash docs/runs/fig8-paper.sh [CELLS.tgz]        resume from a tarball of finished cells, run, and write
#                                                   $OUT/fig8-cells.tgz (bring it back for the next machine)
# When it prints "results:", the run is finished: copy results.csv and manifest.json to docs/runs/.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD EMBER_OFFLINE=1 EMBER_CACHE=${EMBER_CACHE:-/tmp/ec} EMBER_WHEELS=${EMBER_WHEELS:-/tmp/wheels}
ROOT=${EMBER_OUT_ROOT:-/tmp/eo}/fig8
mkdir -p "$ROOT"
if [ -n "${1:-}" ]; then tar xzf "$1" -C "$ROOT"; fi
status=0
EMBER_OUT_ROOT=$ROOT python3 -m ember.cli run fig8 --profile paper || status=$?
tar czf "${OUT:-/tmp}/fig8-cells.tgz" -C "$ROOT" reports/fig8/cells
if [ -f "$ROOT/reports/fig8/results.csv" ]; then cp "$ROOT"/reports/fig8/{results.csv,manifest.json} "${OUT:-/tmp}/"; fi
exit $status
