"""tab2: the cross-framework experiment. Rows for every framework and workload, measured or saying why not;
the llama.cpp timing loop generates what it reports; llama.cpp on the F16 GGUF of ember's weights computes what
ember computes (where llama-cpp-python is installed: `make llama-cpp`)."""

import dataclasses
import importlib.util
import itertools

import pandas as pd
import pytest
import torch

from ember.errors import ParamsError, ReportError
from ember.experiments import cross_framework
from ember.params import load_params


def test_smoke_rows_measure_or_say_why(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    params = load_params("tab2", "smoke", "")
    df, provenance = cross_framework.run(params, progress=False)
    assert list(zip(df["framework"], df["workload"])) == list(itertools.product(params.frameworks,
                                                                                ("batch-1", "rollout")))
    measured = df[df["status"] == "measured"]
    assert set(measured["framework"]) == {"ember", "transformers"}
    rollout = measured[measured["workload"] == "rollout"]
    expected = params.rollout_prompts * params.rollout_candidates * params.gen
    assert (rollout["generated_tokens"] == expected).all()
    assert (measured["tokens_per_s"] > 0).all()
    skipped = df[df["status"] == "not run"]
    assert (skipped["reason"].str.len() > 0).all()
    assert skipped[skipped["framework"] == "llama_cpp_ember"]["reason"].str.contains("not a package model").all()
    summary = cross_framework.summarize(df)
    ember = summary[summary["framework"] == "ember"]
    assert (ember["ember_speedup"] == 1).all()
    latex = cross_framework.latex_table(summary)
    assert "vLLM" in latex and "published" in latex
    stored = tmp_path / "results.csv"  # as REUSE renders it: empty text cells come back as NaN
    df.to_csv(stored, index=False)
    reread = cross_framework.latex_table(cross_framework.summarize(pd.read_csv(stored)))
    assert reread == latex and "nan" not in reread
    assert all(name.startswith("tabTwo") for name in cross_framework.macros(summary))


def test_a_stopped_run_resumes_with_the_rows_it_kept(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    params = load_params("tab2", "smoke", "frameworks=[ember,vllm] time_budget_s=0.000001")
    with pytest.raises(ReportError, match="1 of 2 cells finished"):
        cross_framework.run(params, progress=False)
    calls = []
    real = cross_framework._ember
    monkeypatch.setattr(cross_framework, "_ember", lambda *a: calls.append(a[2]) or real(*a))
    df, _ = cross_framework.run(dataclasses.replace(params, time_budget_s=0.0), progress=False)
    assert len(df) == 4 and list(df["status"]) == ["measured", "measured", "not run", "not run"]
    assert [len(prompts) for prompts in calls] == [params.rollout_prompts]  # batch-1 was kept, not re-measured


def test_duplicate_frameworks_are_refused():
    with pytest.raises(ParamsError, match="each framework once"):
        load_params("tab2", "smoke", "frameworks=[ember,ember]")


class FakeLlama:
    """Stands in for llama_cpp.Llama: records resets and prompts evaluated, yields token ids forever."""

    def __init__(self):
        self.resets, self.evaluated, self.generations = 0, [], 0

    def reset(self):
        self.resets += 1

    def eval(self, tokens):
        self.evaluated.append(list(tokens))

    def generate(self, tokens, **sampling):
        assert sampling["temp"] == 1.0 and sampling["top_k"] == 0
        self.generations += 1
        yield from itertools.count(5)


def test_llama_cpp_timing_generates_what_it_counts():
    fake, prompts = FakeLlama(), [[1, 2, 3], [4, 5, 6]]
    timings = cross_framework.time_llama_cpp(fake, prompts, n=3, gen=7)
    assert timings["generated_tokens"] == 2 * 3 * 7
    assert fake.generations == 6 and fake.evaluated == prompts  # prefill timed once per prompt
    assert fake.resets == 4  # before each prefill and before each prompt's candidates


def test_compile_options_compile_on_cpu_too():
    options = cross_framework.compile_options("cpu")
    assert options["cache_implementation"] == "static"
    assert options["compile_config"]._compile_all_devices


def test_llama_cpp_has_no_gpu_row():
    params = load_params("tab2", "smoke", "model=smollm2-135m-instruct")
    assert "built for the CPU" in cross_framework.why_not("llama_cpp_ember", params, "cuda")


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None,
                    reason="llama-cpp-python is not installed (`make llama-cpp` builds it)")
def test_llama_cpp_on_embers_weights_computes_what_ember_computes(package_model):
    from ember.engine import Engine

    name = "smollm2-135m-instruct"
    package_model(name)
    engine = Engine.load(name, prefix_cache=False)
    prompt = engine.tokenizer.encode("The capital of France is Paris. The capital of Italy is")
    with torch.inference_mode():
        ember_logits = engine.model(torch.tensor([prompt]))[0, -1].float()  # (V,)
    path = cross_framework.llama_cpp_files(name, "float32")["ember"]  # F32: ember's fp32 run
    llm = cross_framework.load_llama_cpp(path, 128, 0, logits_all=True)
    llm.reset()
    llm.eval(prompt)
    llama_logits = torch.tensor(llm.scores[llm.n_tokens - 1][: ember_logits.numel()])
    assert int(llama_logits.argmax()) == int(ember_logits.argmax())
    assert (llama_logits - ember_logits).abs().max() < 0.05 * ember_logits.abs().max()
