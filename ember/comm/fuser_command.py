"""`ember fuser train`: train a fuser (shared context) or, with `--kind projector`, a context-transfer projector
(pairs whose caches differ in shape) for one pair on the offline mix, and export it with a manifest.

  python -m ember.cli fuser train --receiver qwen2.5-0.5b-instruct --sharer qwen2.5-0.5b-instruct \\
      --pair identical --examples 4000 --steps 400 --hidden 256 --device cuda --out docs/fusers/identical
  python -m ember.cli fuser train --kind projector --receiver qwen2.5-0.5b-instruct \
      --sharer qwen2.5-1.5b-instruct --pair strong-to-weak --facts 20 --context-tokens 400 --device cuda \
      --out docs/fusers/strong-to-weak-projector

Checkpoints go to `--work` (default: <out>.work); a run stopped by `--time-budget` (seconds) or killed
resumes there when started again with the same arguments, so long runs fit in pieces of a few minutes.
The export (fuser.safetensors, manifest.json with the git SHA, device, config, loss curve and training
seconds, train_ids.json) is written only when the last step is done; `--lora-control` then also trains the
receiver alone with LoRA on the same batches (the "training alone" control) into <out>/lora.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import torch

from ember.comm.data import training_examples, transfer_training_items
from ember.comm.lora_control import train_lora_control
from ember.comm.train_fuser import FuserConfig, export_fuser, train_fuser
from ember.engine import Engine
from ember.experiments.workloads import resolve_device
from ember.report import device_info, git_state


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ember fuser train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("fuser", "projector"), default="fuser",
                        help="fuser: shared context (MMLU/ARC-E/recall mix); projector: context transfer "
                             "(recall and extraction contexts)")
    parser.add_argument("--receiver", required=True)
    parser.add_argument("--sharer", required=True)
    parser.add_argument("--pair", required=True, help="the pair's name (manifests, plots)")
    parser.add_argument("--examples", type=int, default=2000)
    parser.add_argument("--recall-share", type=float, default=0.25)
    parser.add_argument("--facts", type=int, default=10)
    parser.add_argument("--context-tokens", type=int, default=0, help="projector: recall contexts padded to this")
    parser.add_argument("--extraction-share", type=float, default=0.25, help="projector: share of extraction items")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--lora-control", action="store_true",
                        help="also train the receiver alone with LoRA on the same batches (saved in <out>/lora)")
    parser.add_argument("--lora-rank", type=int, default=16)
    parser.add_argument("--time-budget", type=float, default=0.0, help="stop after this many seconds (resumable)")
    parser.add_argument("--work", default=None, help="checkpoint folder (default: <out>.work)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    device = resolve_device(args.device)
    if str(device).startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True  # frozen fp32 models: TF32 matmuls, recorded in the manifest
    receiver = Engine.load(args.receiver, dtype=args.dtype, device=device, prefix_cache=False, progress=False)
    sharer = receiver if args.sharer == args.receiver else Engine.load(args.sharer, dtype=args.dtype, device=device,
                                                                      prefix_cache=False, progress=False)
    if args.lora_control and args.kind != "fuser":
        parser.error("--lora-control: expected --kind fuser (the control of shared-context fusion)")
    if args.kind == "fuser":
        examples = training_examples(args.examples, args.seed, args.recall_share, args.facts)
    else:
        count = (lambda text: len(receiver.tokenizer.encode(text))) if args.context_tokens else None
        examples = transfer_training_items(args.examples, args.seed, args.extraction_share, args.facts,
                                           args.context_tokens, count)
    config = FuserConfig(hidden=args.hidden, steps=args.steps, batch=args.batch, lr=args.lr,
                         warmup_steps=args.warmup, seed=args.seed)
    work = Path(args.work or f"{args.out}.work")
    meta = {"receiver": args.receiver, "sharer": args.sharer, "recall_share": args.recall_share, "facts": args.facts,
            "dtype": args.dtype, "context_tokens": args.context_tokens, "extraction_share": args.extraction_share}
    run = train_fuser(receiver, sharer, examples, config, folder=work, time_budget_s=args.time_budget, meta=meta,
                      kind=args.kind)
    last = run.history[-1]
    print(json.dumps({"steps_done": len(run.history), "of": config.steps, "loss": last["loss"],
                      "gates_open": last.get("gates_open"), "seconds": round(run.seconds, 1)}), flush=True)
    if not run.finished:
        print(f"stopped at the time budget; run the same command again to resume from {work}")
        return 0
    control = None
    if args.lora_control:
        control, history, seconds = train_lora_control(receiver, examples, config, rank=args.lora_rank, lr=args.lr)
        print(json.dumps({"lora_control_loss": history[-1]["loss"], "seconds": round(seconds, 1)}), flush=True)
    manifest = {"pair": args.pair, "receiver": args.receiver, "sharer": args.sharer, "config": vars(args),
                "git": git_state(), "device": device_info(device),
                "tf32": torch.backends.cuda.matmul.allow_tf32,
                "weights": {"receiver": receiver.provenance, "sharer": sharer.provenance},
                "parameters": sum(p.numel() for p in run.module.parameters())}
    if control is not None:
        manifest["lora_control"] = {"rank": args.lora_rank, "seconds": seconds, "history": history}
    export_fuser(run, args.out, manifest, [e.item_id for e in examples])
    if control is not None:
        control.save(Path(args.out) / "lora")
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {args.out}")
    return 0
