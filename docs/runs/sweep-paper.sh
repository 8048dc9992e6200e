#!/usr/bin/env bash
# fig8's and tab3's paper runs on one GPU, in pieces that each fit a 10-minute device call. First the models:
#   bash docs/runs/fig7-paper.sh setup              (qwen2.5-0.5b-instruct; wheels read from $XFER)
# then, as many times as it takes (each call stops cleanly after the profile's time_budget_s):
#   bash docs/runs/sweep-paper.sh TARGET [CELLS.tgz]   TARGET fig8 or tab3: resume from a tarball of finished
#                                                      cells, run, and write $OUT/TARGET-cells.tgz (bring it
#                                                      back for the next machine)
# When $OUT holds results.csv, the run is finished: copy TARGET-results.csv and TARGET-manifest.json to docs/runs/.
set -euo pipefail
target=${1:?usage: $0 fig8|tab3 [CELLS.tgz]}
export PYTHONPATH=/tmp/site:$PWD EMBER_OFFLINE=1 EMBER_CACHE=${EMBER_CACHE:-/tmp/ec} EMBER_WHEELS=${EMBER_WHEELS:-/tmp/wheels}
ROOT=${EMBER_OUT_ROOT:-/tmp/eo}/$target
mkdir -p "$ROOT"
if [ -n "${2:-}" ]; then tar xzf "$2" -C "$ROOT"; fi
status=0
EMBER_OUT_ROOT=$ROOT python3 -m ember.cli run "$target" --profile paper || status=$?
tar czf "${OUT:-/tmp}/$target-cells.tgz" -C "$ROOT" "reports/$target/cells"
if [ -f "$ROOT/reports/$target/results.csv" ]; then
  cp "$ROOT/reports/$target/results.csv" "${OUT:-/tmp}/$target-results.csv"
  cp "$ROOT/reports/$target/manifest.json" "${OUT:-/tmp}/$target-manifest.json"
fi
exit $status
