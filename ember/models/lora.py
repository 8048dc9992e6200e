"""LoRA: a low-rank slot on the decoder's projections, adapters in the PEFT directory format, in-place hot swap.

Each projection is a `LoraLinear`: an `nn.Linear` (same parameter names, same state_dict) that adds
`scale * B (A x)` when its slot holds tensors. Two ways to fill slots:

* `attach(model, adapter)` points the slots at an adapter's own tensors: gradients flow into them (training,
  and the slow reference path).
* `LoraSlots` preallocates one buffer pair per adapted projection at the largest rank needed and copies an
  adapter into it in place (scale folded into B, smaller ranks zero-padded): swapping adapters moves no
  pointers, so captured CUDA graphs stay valid.

Adapters load from and save to PEFT directories (adapter_config.json + adapter_model.safetensors), so an
adapter trained by ember opens in peft and the other way round.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ember.errors import AdapterError
from ember.models import dispatch, lora_kernel
from ember.report import atomic_directory

PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}
CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"
_PEFT_PREFIX = "base_model.model."
# adapter_config.json fields and the values ember can honour (anything else is refused, naming the field)
_MUST_BE = {"peft_type": ("LORA",), "use_dora": (False, None), "bias": ("none",), "fan_in_fan_out": (False, None),
            "modules_to_save": (None, []), "layer_replication": (None, []), "lora_bias": (False, None),
            "target_parameters": (None, []), "trainable_token_indices": (None, {}, []),
            "exclude_modules": (None, [], "")}
# fields ember reads, or that only describe initialization, provenance or training (harmless to the forward);
# any other field with a set value changes what the adapter computes and is refused
# initializations that leave the base weights alone (others, e.g. pissa / olora / corda / loftq, rewrite them)
_FORWARD_SAFE_INITS = (True, False, "gaussian", "eva", "orthogonal", "mica")
_KNOWN = {"r", "lora_alpha", "target_modules", "layers_to_transform", "layers_pattern", "rank_pattern",
          "alpha_pattern", "use_rslora", "task_type", "peft_version", "base_model_name_or_path", "revision",
          "auto_mapping", "inference_mode", "init_lora_weights", "lora_dropout", "loftq_config", "eva_config",
          "corda_config", "megatron_config", "megatron_core", "qalora_group_size", "use_qalora",
          "ensure_weight_tying"} | set(_MUST_BE)


class LoraLinear(nn.Linear):
    """nn.Linear with an optional low-rank slot: y = W x + b + scale * B (A x), A (r, in), B (out, r).

    Without gradients, on CUDA, for decode-sized inputs and slots shaped for it, the low-rank term runs as one
    fused kernel (`lora_kernel`); `fused = False` (class or instance) forces the two-GEMM reference path.
    """

    fused = os.environ.get("EMBER_FUSED_LORA", "1") != "0"

    def __init__(self, in_features: int, out_features: int, bias: bool = True, **kwargs):
        super().__init__(in_features, out_features, bias=bias, **kwargs)
        self.lora_a: torch.Tensor | None = None  # (r, in); plain attributes: never part of the state_dict
        self.lora_b: torch.Tensor | None = None  # (out, r)
        self.lora_scale = 1.0
        self.lora_in_slot = False  # True when bound to LoraSlots buffers (the fused kernel's layout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias)  # (..., out)
        if self.lora_a is None:
            return y
        fusable = self._fusable(x)
        dispatch.note("lora", "fused" if fusable else "unfused")
        if fusable:
            lora_kernel.lora_add_(y.view(-1, y.shape[-1]), x.reshape(-1, x.shape[-1]).contiguous(), self.lora_a,
                                  self.lora_b)
            return y
        low = F.linear(x, self.lora_a)  # (..., r)
        if self.lora_scale != 1.0:
            low = low * self.lora_scale
        flat = torch.addmm(y.reshape(-1, y.shape[-1]), low.reshape(-1, low.shape[-1]), self.lora_b.t())
        return flat.view(y.shape)

    def _fusable(self, x: torch.Tensor) -> bool:
        return (self.fused and self.lora_in_slot and x.is_cuda and not torch.is_grad_enabled()
                and x.numel() // x.shape[-1] <= lora_kernel.MAX_ROWS and lora_kernel.triton is not None
                and self.in_features <= lora_kernel.MAX_IN_FEATURES and x.dtype == self.lora_a.dtype
                and self.lora_a.shape[0] == lora_kernel.padded_rank(self.lora_a.shape[0]))


def lora_modules(model) -> dict[str, LoraLinear]:
    """{"model.layers.{i}.{self_attn|mlp}.{proj}": module} of every adaptable projection."""
    return {name: module for name, module in model.named_modules() if isinstance(module, LoraLinear)}


def layer_of(module_name: str) -> int:
    """Layer index of a projection name such as model.layers.3.mlp.up_proj."""
    return int(module_name.split(".")[2])


@dataclass
class LoraAdapter:
    """A LoRA adapter: per projection A (r, in) and B (out, r) and its scale (alpha / r, or alpha / sqrt(r)).

    `weights` maps projection names (as in `lora_modules`) to (A, B). `r` and `alpha` are the defaults written
    to adapter_config.json; per-module ranks and scales may differ (rank_pattern / alpha_pattern).
    """

    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]
    r: int
    alpha: float
    use_rslora: bool = False
    meta: dict = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return sorted({layer_of(name) for name in self.weights})

    @property
    def targets(self) -> list[str]:
        return sorted({name.rsplit(".", 1)[1] for name in self.weights})

    def parameters(self) -> list[torch.Tensor]:
        return [t for pair in self.weights.values() for t in pair]

    def layer_digests(self) -> dict[int, str]:
        """{layer: content hash of its modules' A, B and scale}: what per-layer K/V versions are built from."""
        digests = {}
        for layer in self.layers:
            h = hashlib.sha256()
            for name in sorted(n for n in self.weights if layer_of(n) == layer):
                a, b = self.weights[name]
                h.update(f"{name}:{self.scales[name]!r}:{tuple(a.shape)}:{a.dtype}".encode())
                h.update(_tensor_bytes(a))
                h.update(_tensor_bytes(b))
            digests[layer] = h.hexdigest()[:16]
        return digests

    def to(self, device=None, dtype=None) -> "LoraAdapter":
        """A copy on another device / dtype (tensors detached)."""
        weights = {n: (a.detach().to(device=device, dtype=dtype, copy=True),
                       b.detach().to(device=device, dtype=dtype, copy=True)) for n, (a, b) in self.weights.items()}
        return LoraAdapter(weights, dict(self.scales), self.r, self.alpha, self.use_rslora, dict(self.meta))

    @classmethod
    def create(cls, model, r: int, alpha: float, targets=tuple(PROJECTIONS), layers=None, use_rslora: bool = False,
               seed: int = 0, dtype=torch.float32) -> "LoraAdapter":
        """A trainable adapter for `model`: A drawn like peft's default (Kaiming-uniform), B zero (so the
        adapted model starts equal to the base). Tensors require grad."""
        if r < 1:
            raise AdapterError(f"LoRA rank r: expected >= 1, found {r}")
        unknown = sorted(set(targets) - set(PROJECTIONS))
        if unknown:
            raise AdapterError(f"target_modules: expected names among {sorted(PROJECTIONS)}, found {unknown}")
        generator = torch.Generator().manual_seed(seed)
        weights, scales = {}, {}
        for name, module in lora_modules(model).items():
            if name.rsplit(".", 1)[1] in targets and (layers is None or layer_of(name) in layers):
                bound = 1 / math.sqrt(module.in_features)
                a = (torch.rand(r, module.in_features, generator=generator) * 2 - 1) * bound
                device = module.weight.device
                weights[name] = (a.to(device, dtype).requires_grad_(),
                                 torch.zeros(module.out_features, r, device=device, dtype=dtype).requires_grad_())
                scales[name] = _scale(alpha, r, use_rslora)
        if not weights:
            raise AdapterError(f"LoRA targets {list(targets)} on layers {layers}: matched no projection of the model")
        return cls(weights, scales, r, float(alpha), use_rslora)

    @classmethod
    def load(cls, path, model=None, device=None, dtype=None) -> "LoraAdapter":
        """Read a PEFT LoRA directory. With `model`, check that every module exists there with the right shapes."""
        from safetensors.torch import load_file

        path = Path(path)
        config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
        if not config_path.is_file() or not weights_path.is_file():
            raise AdapterError(f"adapter {path}: expected {CONFIG_FILE} and {WEIGHTS_FILE}, found "
                               f"{sorted(p.name for p in path.iterdir()) if path.is_dir() else 'no directory'}")
        try:
            config = json.loads(config_path.read_text())
        except json.JSONDecodeError as error:
            raise AdapterError(f"adapter {config_path}: expected JSON, found a parse error ({error})") from error
        _check_config(config, config_path)
        try:
            state = load_file(str(weights_path))
        except Exception as error:  # safetensors raises its own error types
            raise AdapterError(f"adapter {weights_path}: cannot be read ({error})") from error
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, tensor in state.items():
            match = re.fullmatch(r"(?:base_model\.model\.)?(.+)\.lora_([AB])(?:\.[^.]+)?\.weight", key)
            if match is None:
                raise AdapterError(f"adapter {weights_path}: expected keys '<module>.lora_A.weight' / "
                                   f"'<module>.lora_B.weight', found {key!r}")
            pairs.setdefault(match.group(1), {})[match.group(2)] = tensor
        r, alpha, rslora = int(config["r"]), float(config.get("lora_alpha", 8)), bool(config.get("use_rslora", False))
        weights, scales = {}, {}
        for name, pair in sorted(pairs.items()):
            parts = name.split(".")
            if len(parts) != 5 or parts[:2] != ["model", "layers"] or parts[4] not in PROJECTIONS \
                    or PROJECTIONS[parts[4]] != parts[3] or not parts[2].isdigit():
                raise AdapterError(f"adapter {weights_path}: module {name!r} is not one ember can adapt "
                                   f"(expected model.layers.<i>.self_attn|mlp.<{'|'.join(PROJECTIONS)}>)")
            if set(pair) != {"A", "B"}:
                raise AdapterError(f"adapter {weights_path}: module {name} has lora_{''.join(pair)} only, "
                                   f"expected both lora_A and lora_B")
            a, b = pair["A"], pair["B"]
            if a.shape[0] != b.shape[1]:
                raise AdapterError(f"adapter {weights_path}: module {name} lora_A {tuple(a.shape)} and lora_B "
                                   f"{tuple(b.shape)} disagree on the rank")
            rank = _pattern_value(config.get("rank_pattern") or {}, name, r)
            if rank != a.shape[0]:
                raise AdapterError(f"adapter {path}: module {name} rank: expected {rank} from the config, found "
                                   f"{a.shape[0]} in the weights")
            weights[name] = (a.to(device=device, dtype=dtype), b.to(device=device, dtype=dtype))
            scales[name] = _scale(_pattern_value(config.get("alpha_pattern") or {}, name, alpha), rank, rslora)
        if not weights:
            raise AdapterError(f"adapter {weights_path}: expected LoRA weights, found none")
        adapter = cls(weights, scales, r, alpha, rslora, {"source": str(path.resolve())})
        if model is not None:
            check_fits(adapter, model)
        return adapter

    def save(self, path) -> Path:
        """Write the adapter as a PEFT directory (atomically: temp folder + rename)."""
        from safetensors.torch import save_file

        path = Path(path)
        ranks = {name: a.shape[0] for name, (a, _) in self.weights.items()}
        alphas = {name: self.scales[name] * (math.sqrt(ranks[name]) if self.use_rslora else ranks[name])
                  for name in self.weights}
        config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
            "target_modules": self.targets, "layers_to_transform": self.layers, "layers_pattern": "layers",
            "use_rslora": self.use_rslora, "bias": "none", "lora_dropout": 0.0, "use_dora": False,
            "fan_in_fan_out": False, "modules_to_save": None, "init_lora_weights": True, "inference_mode": True,
            "rank_pattern": {_exact(n): k for n, k in ranks.items() if k != self.r},
            "alpha_pattern": {_exact(n): a for n, a in alphas.items() if not math.isclose(a, self.alpha)},
            "base_model_name_or_path": self.meta.get("base_model"),
        }
        state = {}
        for name, (a, b) in self.weights.items():
            state[f"{_PEFT_PREFIX}{name}.lora_A.weight"] = a.detach().contiguous().cpu()
            state[f"{_PEFT_PREFIX}{name}.lora_B.weight"] = b.detach().contiguous().cpu()
        with atomic_directory(path) as tmp:
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            save_file(state, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        return path


def check_fits(adapter: LoraAdapter, model) -> None:
    """Raise AdapterError unless every adapted module exists in `model` with matching shapes."""
    modules = lora_modules(model)
    for name, (a, b) in adapter.weights.items():
        module = modules.get(name)
        if module is None:
            raise AdapterError(f"adapter module {name}: expected one of the model's {len(modules)} projections "
                               f"(layers 0..{model.config.num_layers - 1}), found none by that name")
        if a.shape[1] != module.in_features or b.shape[0] != module.out_features:
            raise AdapterError(f"adapter module {name}: expected A (r, {module.in_features}) and B "
                               f"({module.out_features}, r), found {tuple(a.shape)} and {tuple(b.shape)}")


def attach(model, adapter: LoraAdapter | None) -> None:
    """Point the model's slots at the adapter's own tensors (None clears every slot): no copy, so gradients
    reach the adapter. The reference path for the in-place `LoraSlots`."""
    if adapter is not None:
        check_fits(adapter, model)
    for name, module in lora_modules(model).items():
        pair = adapter.weights.get(name) if adapter is not None else None
        a, b = pair if pair is not None else (None, None)
        set_binding(module, a, b, scale=adapter.scales[name] if pair is not None else 1.0, in_slot=False)


@contextmanager
def kept_bindings(modules):
    """Give these projections back the slot bindings they had on entry, whatever is bound inside the block."""
    saved = [(module, binding(module)) for module in modules]
    try:
        yield
    finally:
        for module, (a, b, scale, in_slot) in saved:
            set_binding(module, a, b, scale=scale, in_slot=in_slot)


def clear_bindings(modules) -> None:
    """Empty the slots of these projections (the base model)."""
    for module in modules:
        set_binding(module, None, None, scale=1.0, in_slot=False)


class LoraSlots:
    """Preallocated slot buffers for a layout {module name: rank}; adapters are copied in, never re-pointed.

    `pack(adapter)` returns the adapter as tensors shaped like the buffers (scale folded into B, ranks
    zero-padded, absent modules zero), so a swap is one multi-tensor copy: `load(packed)`.
    """

    def __init__(self, model, layout: dict[str, int]):
        self.model = model
        weight = model.output_weight
        if weight.is_cuda and lora_kernel.available():  # ranks the fused kernel takes (zero rows cost nothing)
            layout = {name: lora_kernel.padded_rank(rank) for name, rank in layout.items()}
        self.layout = dict(sorted(layout.items()))
        modules = lora_modules(model)
        self.modules = [modules[name] for name in self.layout]
        self.all_modules = list(modules.values())
        self.buffers = []
        for module, rank in zip(self.modules, self.layout.values()):
            a = torch.zeros(rank, module.in_features, dtype=weight.dtype, device=weight.device)  # (r, in)
            b = torch.zeros(module.out_features, rank, dtype=weight.dtype, device=weight.device)  # (out, r)
            self.buffers += [a, b]

    @staticmethod
    def layout_for(adapters) -> dict[str, int]:
        """The smallest layout holding every adapter: union of modules, largest rank per module."""
        layout: dict[str, int] = {}
        for adapter in adapters:
            for name, (a, _) in adapter.weights.items():
                layout[name] = max(layout.get(name, 0), a.shape[0])
        return layout

    def fits(self, adapter: LoraAdapter) -> bool:
        return all(name in self.layout and a.shape[0] <= self.layout[name] for name, (a, _) in adapter.weights.items())

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.buffers)

    def pack(self, adapter: LoraAdapter) -> list[torch.Tensor]:
        """Tensors shaped like `buffers` holding `adapter` (B pre-scaled in fp32, then cast)."""
        packed = []
        for (name, rank), module in zip(self.layout.items(), self.modules):
            a_full = torch.zeros(rank, module.in_features, dtype=self.buffers[0].dtype, device=self.buffers[0].device)
            b_full = torch.zeros(module.out_features, rank, dtype=a_full.dtype, device=a_full.device)
            if name in adapter.weights:
                a, b = adapter.weights[name]
                a_full[:a.shape[0]] = a.detach()
                b_full[:, :b.shape[1]] = b.detach().float() * adapter.scales[name]
            packed += [a_full, b_full]
        return packed

    def load(self, packed: list[torch.Tensor] | None) -> None:
        """Copy a packed adapter into the slots in place and bind them; None unbinds (the base model)."""
        if packed is not None:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, packed)
        self.bind(packed is not None)

    def bind(self, active: bool) -> None:
        """Point the model's projections at these slots (active) or clear them. Projections outside the
        layout are cleared too: whoever binds owns every slot of the model until the next bind or `attach`.
        Only projections whose binding differs are touched (module attribute writes are slow)."""
        slots = dict(zip(map(id, self.modules), zip(self.buffers[::2], self.buffers[1::2]))) if active else {}
        for module in self.all_modules:
            set_binding(module, *slots.get(id(module), (None, None)), scale=1.0, in_slot=id(module) in slots)


def binding(module: LoraLinear) -> tuple:
    """What a projection's slot holds: (A, B, scale, in_slot)."""
    return module.lora_a, module.lora_b, module.lora_scale, module.lora_in_slot


def set_binding(module: LoraLinear, a, b, scale: float, in_slot: bool) -> None:
    """Set a projection's slot, writing the module only when something differs."""
    if module.lora_a is not a or module.lora_b is not b or module.lora_scale != scale \
            or module.lora_in_slot != in_slot:
        module.lora_a, module.lora_b, module.lora_scale, module.lora_in_slot = a, b, scale, in_slot


def _scale(alpha: float, rank: int, use_rslora: bool) -> float:
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def _pattern_value(pattern: dict, name: str, default):
    """peft's rank_pattern / alpha_pattern lookup: the first key matching the end of the module name."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _exact(name: str) -> str:
    """A pattern key that matches exactly this module name."""
    return re.escape(name)


def _check_config(config: dict, where: Path) -> None:
    for name in sorted(set(config) - _KNOWN):
        if config[name] not in (None, False, 0, "", [], {}):
            raise AdapterError(f"adapter {where}: {name} = {config[name]!r} is not supported by ember (a LoRA "
                               f"variant it would compute as plain LoRA)")
    if config.get("init_lora_weights", True) not in _FORWARD_SAFE_INITS:
        safe = sorted(map(str, _FORWARD_SAFE_INITS))
        raise AdapterError(f"adapter {where}: init_lora_weights = {config['init_lora_weights']!r} is not supported "
                           f"by ember (it rewrites the base weights; expected one of {safe})")
    if config.get("use_qalora"):
        raise AdapterError(f"adapter {where}: use_qalora = True is not supported by ember (expected False)")
    for name, allowed in _MUST_BE.items():
        if name in config and config[name] not in allowed:
            raise AdapterError(f"adapter {where}: {name} = {config[name]!r} is not supported by ember "
                               f"(expected {allowed[0]!r})")
    if config.get("peft_type") is None:
        raise AdapterError(f"adapter {where}: expected peft_type 'LORA', found none")
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"adapter {where}: r: expected an integer >= 1, found {config.get('r')!r}")
    targets = config.get("target_modules")
    if isinstance(targets, list):
        unknown = sorted(set(targets) - set(PROJECTIONS))
        if unknown:
            raise AdapterError(f"adapter {where}: target_modules {unknown} are not projections ember can adapt "
                               f"(expected names among {sorted(PROJECTIONS)})")


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
