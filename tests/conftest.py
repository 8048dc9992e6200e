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


def pytest_collection_modifyitems(config, items):
    """Skip `gpu`-marked tests where no CUDA device is present, with the reason shown."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (none here)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
