"""Unified vs dual stack: what it costs to get a trained adapter into the rollout weights.

Unified (ember): trainer and rollout engine share one model; a sync is the in-place swap of the adapter into the
engine's LoRA slots. Dual (a trainer copy plus a rollout copy, as RL stacks that pair a training framework with an
inference server do): a sync merges the adapter into the trainer's weights and copies every weight into the
rollout copy, or reloads the merged weights from a safetensors file on disk. Each is measured here."""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from ember.engine.timers import median_seconds
from ember.models.lora import lora_modules


def tensor_bytes(tensors) -> int:
    """Bytes held by `tensors`."""
    return sum(t.numel() * t.element_size() for t in tensors)


@torch.no_grad()
def merged_state(model, adapter) -> dict[str, torch.Tensor]:
    """The model's weights with the adapter merged in: W + scale x B @ A for adapted projections."""
    names = {id(module): name for name, module in lora_modules(model).items()}
    state = {}
    for name, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            full = f"{name}.{pname}" if name else pname
            lora = names.get(id(module))
            if pname == "weight" and lora in adapter.weights:
                a, b = adapter.weights[lora]
                state[full] = param + adapter.scales[lora] * (b.to(param.dtype) @ a.to(param.dtype))
            else:
                state[full] = param
    return state


def measure_sync(engine, adapter, folder: Path, repeats: int = 3) -> list[dict]:
    """Rows {method, sync_s, weights_bytes} for the in-place swap (unified), copying merged weights into a second
    copy, and reloading them from safetensors (dual). `weights_bytes` counts the model copies each stack holds
    (the second copy is really allocated here and its allocation measured, then freed)."""
    from safetensors.torch import load_file, save_file

    model, device = engine.model, engine.device
    one_copy = tensor_bytes(model.parameters())
    swap = median_seconds(lambda: engine.set_adapter(engine.load_adapter(adapter, "sync-probe")), device, repeats)
    engine.set_adapter(None)
    engine.remove_adapter("sync-probe")
    cuda = torch.device(device).type == "cuda"
    before = torch.cuda.memory_allocated(device) if cuda else 0
    rollout_copy = copy.deepcopy(model)  # the dual stack's second model
    second = torch.cuda.memory_allocated(device) - before if cuda else tensor_bytes(rollout_copy.parameters())
    targets = dict(rollout_copy.named_parameters())

    @torch.no_grad()
    def copy_merged():
        for name, value in merged_state(model, adapter).items():
            targets[name].copy_(value)

    copied = median_seconds(copy_merged, device, repeats)
    path = Path(folder) / "merged.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous().cpu() for k, v in merged_state(model, adapter).items()}, str(path))

    @torch.no_grad()
    def reload():
        for name, value in load_file(str(path)).items():
            targets[name].copy_(value)

    reloaded = median_seconds(reload, device, repeats)
    path.unlink()
    del rollout_copy, targets
    return [{"method": "in-place adapter swap (unified)", "sync_s": swap, "weights_bytes": one_copy},
            {"method": "copy merged weights (dual)", "sync_s": copied, "weights_bytes": one_copy + second},
            {"method": "reload safetensors (dual)", "sync_s": reloaded, "weights_bytes": one_copy + second}]
