"""`ember eval recall`: recall accuracy of a model at several fact counts, as JSON.

  python -m ember.cli eval recall --model qwen2.5-0.5b-instruct --facts 5,10,20 --items 100 --out recall.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from ember.engine import Engine
from ember.report import atomic_write, run_manifest
from ember.tasks.evaluate import evaluate
from ember.tasks.recall import recall_items, score


def run(model: str, facts: list[int], items: int, seed: int, dtype: str, device: str, max_tokens: int) -> dict:
    engine = Engine.load(model, dtype=dtype, device=device, prefix_cache=False, max_batch_size=16)
    params = {"model": model, "facts": facts, "items": items, "seed": seed, "dtype": dtype, "max_tokens": max_tokens}
    report = run_manifest("eval-recall", params, engine.provenance, device, extra={"results": []})
    for count in facts:
        began = time.perf_counter()
        tasks = recall_items(items, count, seed=seed)
        result = evaluate(engine, tasks, score, max_tokens=max_tokens)
        lost = evaluate(engine, [t.without_fact() for t in tasks], score, max_tokens=max_tokens)
        row = {k: result[k] for k in ("accuracy", "ci_low", "ci_high", "n")}
        row.update(facts=count, accuracy_fact_removed=lost["accuracy"], seconds=round(time.perf_counter() - began, 1),
                   examples=[r["output"] for r in result["items"][:3]])
        report["results"].append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "examples"}), flush=True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="ember eval recall", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="qwen2.5-0.5b-instruct")
    parser.add_argument("--facts", default="5,10,20", help="comma-separated fact counts")
    parser.add_argument("--items", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--out", default="reports/eval/recall.json")
    args = parser.parse_args(argv)
    report = run(args.model, [int(f) for f in args.facts.split(",")], args.items, args.seed, args.dtype,
                 args.device, args.max_tokens)
    atomic_write(Path(args.out), json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0
