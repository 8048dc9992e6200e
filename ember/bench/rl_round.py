"""RL round speed: one round = rollouts of P prompts x N candidates (gen tokens each) + a GRPO step on them.
Reports rollout seconds by stage, rollout tokens/s (generated tokens over rollout time) and training tokens/s
(prompt + completion tokens of the trained sequences over the train step), against the target of a paper round
(100 prompts x 8 candidates, 128 new tokens) rolled out in under 20 s on one GPU.

  ember bench rl_round --model qwen2.5-0.5b-instruct --prompts 100 --candidates 8 --max-tokens 128
  ember bench rl_round --from docs/runs/fig3-paper-h200-qwen0.5b-r4   # summarize the rounds of a fig3 run
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pandas as pd

from ember.errors import ReportError
from ember.report import atomic_write, run_manifest

TARGET_ROLLOUT_S = 20.0


def summarize(rows: pd.DataFrame, prompts: int, candidates: int) -> dict:
    """Medians over rounds after the first (warm-up) of loop rows: rollout seconds by stage, rollout tokens/s
    and training tokens/s (trained sequences x their mean length, prompt included, over the train step)."""
    length = rows["prompt_tokens"] / prompts + rows["generated_tokens"] / (prompts * candidates)
    rows = rows.assign(trained_tokens=rows["train_sequences"] * length)
    measured = rows[rows["round"] > 0] if (rows["round"] > 0).any() else rows
    trained = measured[measured["train_sequences"] > 0]
    median = measured.median(numeric_only=True)
    return {"rounds_measured": int(len(measured)), "rollout_s": float(median["rollout_s"]),
            "prefill_s": float(median["prefill_s"]), "decode_s": float(median["decode_s"]),
            "sampling_s": float(median["sampling_s"]), "refresh_s": float(median["refresh_s"]),
            "rollout_tokens_per_s": float((measured["generated_tokens"] / measured["rollout_s"]).median()),
            "train_s": float(median["train_s"]),
            "train_tokens_per_s": float((trained["trained_tokens"] / trained["train_s"]).median())
            if len(trained) else None,
            "target_rollout_s": TARGET_ROLLOUT_S, "meets_target": bool(median["rollout_s"] < TARGET_ROLLOUT_S)}


def from_run(folder: Path) -> dict:
    """The summary of a finished fig3 run (results.csv + manifest.json), per policy; its manifest's SHA."""
    csv, manifest_path = folder / "results.csv", folder / "manifest.json"
    if not csv.is_file() or not manifest_path.is_file():
        raise ReportError(f"bench rl_round --from {folder}: expected results.csv and manifest.json, found neither "
                          f"or one")
    df, manifest = pd.read_csv(csv), json.loads(manifest_path.read_text())
    params = manifest["params"]
    per_policy = {policy: summarize(rows, params["prompts"], params["candidates"])
                  for policy, rows in df.groupby("policy")}
    return {"source": str(folder), "model": params["model"], "prompts": params["prompts"],
            "candidates": params["candidates"], "max_tokens": params["max_tokens"], "git": manifest["git"],
            "device": manifest["device"], "per_policy": per_policy}


def measure(model: str, prompts: int, candidates: int, max_tokens: int, rounds: int, device: str) -> dict:
    """Run `rounds` + 1 rounds (the first is warm-up) of GRPO under PrefixOnly and summarize them."""
    from ember.experiments.rl_runs import RLParams, load_engine, loop_config, prompt_sets, train_config
    from ember.policies import PolicyRunner, PrefixOnly
    from ember.train import make_trainer
    from ember.train.loop import run_round

    params = RLParams(model=model, device=device, prompts=prompts, candidates=candidates, max_tokens=max_tokens,
                      rounds=rounds + 1, rollout_batch=prompts * candidates, dtype="float32")
    engine = load_engine(params)
    task, _ = prompt_sets(engine, params)
    runner = PolicyRunner(engine, PrefixOnly())
    trainer = make_trainer("grpo", engine.model, train_config(params), engine._pad_id)
    rows = pd.DataFrame([run_round(runner, trainer, task, loop_config(params), r) for r in range(rounds + 1)])
    return {"model": model, "prompts": prompts, "candidates": candidates, "max_tokens": max_tokens,
            **summarize(rows, prompts, candidates)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ember bench rl_round", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="source", type=Path, help="summarize a finished fig3 run folder instead")
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--candidates", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="measured rounds (after one warm-up round)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default="reports/bench/rl_round.json")
    args = parser.parse_args(argv)
    if args.source is not None:
        report = from_run(args.source)
    else:
        result = measure(args.model, args.prompts, args.candidates, args.max_tokens, args.rounds, args.device)
        report = run_manifest("bench-rl_round", vars(args) | {"source": None}, {}, args.device, extra=result)
    atomic_write(Path(args.out), json.dumps(report, indent=2, default=str) + "\n")
    print(f"wrote {args.out}")
    return 0
