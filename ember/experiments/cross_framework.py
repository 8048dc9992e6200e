"""tab2: cross-framework throughput. The same prompts and generation lengths (sampling at temperature 1, EOS
ignored) at batch 1 and in a rollout batch (P prompts x n candidates), through ember, transformers eager,
transformers with a static cache and torch.compile (compile time reported apart), llama.cpp on a GGUF written
from ember's weights in the run's dtype and on the package's own quantized GGUF, and vLLM / SGLang where they
can run.
A framework that cannot run here gets a row that says why, and its published numbers are cited as such.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch

from ember.bench.generate import hf_twin, median_of_runs, time_ember, time_hf
from ember.engine import Engine
from ember.errors import ModelLoadError, ParamsError
from ember.experiments.cells import CellStore
from ember.experiments.workloads import random_prompts, resolve_device
from ember.params import RunParams, param
from ember.report import device_info, latex_escaped, macro_name

FRAMEWORKS = ("ember", "transformers", "transformers_compiled", "llama_cpp_ember", "llama_cpp_quant", "vllm",
              "sglang")
LABELS = {"ember": "ember", "transformers": "transformers (eager)",
          "transformers_compiled": "transformers (static cache + torch.compile)",
          "llama_cpp_ember": "llama.cpp (GGUF of ember's weights)", "llama_cpp_quant": "llama.cpp (package GGUF)",
          "vllm": "vLLM", "sglang": "SGLang"}
CAVEATS = {
    "ember": "prefill: each prompt once for its n candidates; CUDA graphs on GPU",
    "transformers": "generate() with num_return_sequences; prefill: a 1-token generate, each prompt once per "
                    "candidate",
    "transformers_compiled": "static cache, compiled per workload in a fresh process state (empty on-disk compile "
                             "caches, static shapes); tokens/s after the compile",
    "llama_cpp_ember": "a GGUF of ember's weights in the run's dtype (F32 or F16); llama-cpp-python decodes one "
                       "sequence at a time, a prompt's K/V reused by its next candidate; prefill: each prompt "
                       "once, one after another",
    "llama_cpp_quant": "as the row above, on the quantized weights ember's were converted from (other numbers)",
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
    "vllm": f"not installed: its wheels pin their own CUDA torch build, not the torch {torch.__version__} ember "
            f"runs on, and the GPU machine cannot fetch or carry that stack",
    "sglang": "not installed: it needs vLLM-style CUDA kernels and its own torch pin, as vLLM",
}


@dataclass(frozen=True)
class Params(RunParams):
    """Frameworks and the two workloads of tab2."""

    frameworks: tuple[str, ...] = param(("ember", "transformers", "llama_cpp_ember", "vllm", "sglang"),
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


def _timed(run_once, params) -> dict:
    """`params.warmup` untimed runs of the full workload (CUDA graphs captured at the timed length), then the
    median of `params.repeats` timed ones."""
    for _ in range(params.warmup):
        run_once()
    return median_of_runs([run_once() for _ in range(params.repeats)])


def _ember(engine, params, prompts, n):
    return _timed(lambda: time_ember(engine, prompts, n, params.gen), params), None


def _transformers(twin, params, prompts, n, device):
    return _timed(lambda: time_hf(twin, prompts, n, params.gen, device), params), None


def _transformers_compiled(engine, params, prompts, n, device):
    """A fresh twin and a reset compiler per workload, so a cell's compile is the same whether the run was
    resumed or not; the first generate compiles (its extra time is compile_s), the others are timed."""
    torch._dynamo.reset()
    twin = hf_twin(engine.model, device, engine.model.output_weight.dtype)
    options = compile_options(device)
    with cold_compile_caches():
        began = time.perf_counter()
        time_hf(twin, prompts, n, params.gen, device, **options)
        first_s = time.perf_counter() - began
        runs = _timed(lambda: time_hf(twin, prompts, n, params.gen, device, **options), params)
    return runs, max(first_s - runs["prefill_s"] - runs["total_s"], 0.0)


def compile_options(device) -> dict:
    """generate() options of the compiled transformers row: a static cache, and torch.compile of the forward
    with static shapes (transformers compiles on its own on CUDA; elsewhere its compile config is told to)."""
    from transformers import CompileConfig

    config = CompileConfig(mode="reduce-overhead" if torch.device(device).type == "cuda" else "default",
                           dynamic=False)
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


def llama_cpp_files(model: str, dtype: str) -> dict[str, Path]:
    """{'quant': the package's source GGUF, 'ember': a GGUF of ember's weights in `dtype` (F32 for float32, else
    F16)}, made once next to the converted model."""
    from ember.bench.gguf_export import write_gguf
    from ember.models import packages

    folder = packages.ensure(model)  # refuses a name that is not a package model
    kind = "f32" if dtype == "float32" else "f16"
    files = {"quant": folder / "gguf" / "source.gguf", "ember": folder / "gguf" / f"ember-{kind}.gguf"}
    files["quant"].parent.mkdir(exist_ok=True)
    if not files["quant"].exists():
        partial = files["quant"].with_name(".source.gguf.partial")
        try:
            packages.fetch_gguf(model, partial, progress=lambda message: None)
            partial.replace(files["quant"])
        finally:
            partial.unlink(missing_ok=True)
    if not files["ember"].exists():
        write_gguf(folder, files["quant"], files["ember"], kind)
    return files


def load_llama_cpp(path: Path, context: int, seed: int, logits_all: bool = False):
    """A llama.cpp model on the CPU threads torch uses (raises ModelLoadError without llama-cpp-python);
    `logits_all` keeps every position's logits in `.scores` (for comparisons; timing runs leave it off)."""
    try:
        from llama_cpp import Llama
    except ImportError as error:
        raise ModelLoadError(f"llama-cpp-python is not installed ({error}); `make llama-cpp` builds it from the "
                             f"PyPI source") from error
    threads = torch.get_num_threads()
    return Llama(str(path), n_ctx=context, n_batch=512, n_threads=threads, n_threads_batch=threads, seed=seed,
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


def _llama_cpp(llm, params, prompts, n):
    return _timed(lambda: time_llama_cpp(llm, prompts, n, params.gen), params), None


def why_not(name: str, params: Params, device) -> str | None:
    """Why a framework cannot run here (None when it can): checked on every run, never stored, so a row that
    could not run is measured as soon as it can (after `make llama-cpp`, say)."""
    from ember.models import packages

    if name.startswith("llama_cpp"):
        if torch.device(device).type != "cpu":
            return ("llama-cpp-python is built for the CPU here (`make llama-cpp`); a CUDA build does not fit the "
                    "offline GPU machine")
        if params.model not in packages.PACKAGE_MODELS:
            return f"needs a package model's GGUF (tokenizer, metadata); {params.model} is not a package model"
        if importlib.util.find_spec("llama_cpp") is None:
            return "llama-cpp-python is not installed; `make llama-cpp` builds it from the PyPI source"
    if name in WHY_NOT:
        return WHY_NOT[name] if importlib.util.find_spec(name) is None else \
            f"{name} is installed, but ember has no {name} row (its torch differs from ember's pin)"
    return None


def _runner(name: str, params: Params, engine, device):
    """A function (prompts, n) -> (timings, compile_s) for a framework that can run."""
    if name == "ember":
        return lambda prompts, n: _ember(engine, params, prompts, n)
    if name == "transformers":  # one twin for both workloads (the compiled row makes its own per workload)
        twin = hf_twin(engine.model, device, engine.model.output_weight.dtype)
        return lambda prompts, n: _transformers(twin, params, prompts, n, device)
    if name == "transformers_compiled":
        return lambda prompts, n: _transformers_compiled(engine, params, prompts, n, device)
    path = llama_cpp_files(params.model, params.dtype)["ember" if name == "llama_cpp_ember" else "quant"]
    llm = load_llama_cpp(path, params.context + params.gen + 8, params.seed)
    return lambda prompts, n: _llama_cpp(llm, params, prompts, n)


def host(device) -> str:
    """What the timings depend on beyond the params: the GPU or CPU model, torch's threads, llama.cpp's version."""
    info = device_info(device)
    llama = importlib.util.find_spec("llama_cpp") and importlib.metadata.version("llama_cpp_python")
    return f"{info.get('gpu') or info.get('cpu')}, {info['torch_threads']} threads, llama-cpp-python {llama or '-'}"


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """One row per framework and workload (a median over repeats): seconds, tokens/s, compile seconds, or why it
    did not run. Each measured row is a stored cell, keyed by the params, the code and the host, so a run stopped
    by `time_budget_s` resumes where it stopped and timings of different machines never mix."""
    device = resolve_device(params.device)
    machine = host(device)
    store = CellStore(dataclasses.replace(params, device=f"{device} on {machine}"), params.time_budget_s,
                      distribute=False)  # timings compared with each other: one machine, serial
    engine = Engine.load(params.model, dtype=params.dtype, device=device, seed=params.seed,
                         max_batch_size=params.rollout_prompts * params.rollout_candidates, prefix_cache=False,
                         progress=False)
    prompts = random_prompts(engine.model.config.vocab_size, params.rollout_prompts, params.context, params.seed)
    runners: dict[str, object] = {}  # framework -> its measure function, made at its first missing cell
    reasons = {name: why_not(name, params, device) for name in params.frameworks}

    def base(name: str, workload: str, count: int, n: int) -> dict:
        return {"framework": name, "label": LABELS[name], "workload": workload, "prompts": count, "candidates": n,
                "context": params.context, "gen": params.gen, "device": str(device), "host": machine}

    def measured(name: str, workload: str, count: int, n: int) -> pd.DataFrame:
        if name not in runners:
            runners[name] = _runner(name, params, engine, device)
        timings, compile_s = runners[name](prompts[:count], n)
        return pd.DataFrame([{**base(name, workload, count, n), "status": "measured", "reason": "",
                              "caveat": CAVEATS[name], **timings, "compile_s": compile_s}])

    cells = {f"{name}/{workload}": (lambda a=(name, workload, count, n): measured(*a))
             for name in params.frameworks if reasons[name] is None for workload, count, n in workloads(params)}
    frames = [store.run(cells, progress)] if cells else []
    frames += [pd.DataFrame([{**base(name, *workload), "status": "not run", "reason": reasons[name],
                              "caveat": PUBLISHED.get(name, "")} for workload in workloads(params)])
               for name in params.frameworks if reasons[name] is not None]
    df = pd.concat(frames, ignore_index=True)
    order = {name: i for i, name in enumerate(params.frameworks)}
    df = df.sort_values("framework", key=lambda column: column.map(order), kind="stable", ignore_index=True)
    return df, {**engine.provenance, "run_key": store.run_key, "host": machine}


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
    table = summary.copy()  # empty text cells read back from results.csv as NaN: only strings make the note
    table["note"] = ["; ".join(text for text in (row.reason, row.caveat) if isinstance(text, str) and text)
                     for row in table.itertuples()]
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
        if pd.notna(row.compile_s):  # the compiled row's compile seconds
            values[macro_name(target, "compile s", row.framework, row.workload)] = row.compile_s
    return values
