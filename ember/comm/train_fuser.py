"""Training a fuser (shared context) or a projector (context transfer) with both LLMs frozen: next-token loss
of the receiver's answer tokens after the fused (or projected) cache, AdamW with linear warmup, gradient
clipping, and for the fuser the gate temperature annealed from 1 to 0.001.

Runs resume: every `checkpoint_every` steps (and at a time budget) the fuser, the optimizer, the RNG states and
the loss history are written atomically to `folder/step-NNNNNN` and named in `folder/LATEST`; a run started
again with the same config continues from there and ends with the same fuser as an uninterrupted one.
`export_fuser` writes the final weights and a manifest (kind, pair, config, training ids, seconds);
`load_fuser` builds the module the manifest names.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ember.comm.fuser import Fuser
from ember.comm.fusion import fusion_batch, fusion_loss
from ember.comm.projector import Projector
from ember.comm.transfer_training import transfer_batch, transfer_loss
from ember.errors import CommError
from ember.report import atomic_directory, atomic_write
from ember.train.checkpoint import rng_state, set_rng_state

LATEST = "LATEST"
KINDS = {"fuser": Fuser, "projector": Projector}  # what a run trains: shared context / context transfer


@dataclass(frozen=True)
class FuserConfig:
    """Width and optimization of a fuser run."""

    hidden: int = 256
    steps: int = 100
    batch: int = 8
    lr: float = 1e-4
    warmup_steps: int = 10
    clip: float = 1.0
    weight_decay: float = 0.01
    seed: int = 0
    checkpoint_every: int = 25

    def __post_init__(self):
        for name in ("hidden", "steps", "batch", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise CommError(f"FuserConfig.{name}: expected >= 1, found {getattr(self, name)}")
        if self.lr <= 0 or self.clip <= 0 or self.warmup_steps < 0 or self.weight_decay < 0:
            raise CommError(f"FuserConfig: expected lr > 0, clip > 0, warmup_steps >= 0 and weight_decay >= 0, "
                            f"found {self.lr}, {self.clip}, {self.warmup_steps}, {self.weight_decay}")


@dataclass
class FuserRun:
    """A training run's module (a Fuser or a Projector), per-step history, whether it reached `steps`, and its
    training seconds."""

    module: Fuser | Projector
    history: list[dict] = field(default_factory=list)
    finished: bool = False
    seconds: float = 0.0


def batch_order(count: int, config: FuserConfig, step: int) -> list[int]:
    """Example indices of one step: epochs are seeded permutations, so any step's batch is known without
    replaying the ones before it."""
    per_epoch = max(count // config.batch, 1)
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(count, generator=torch.Generator().manual_seed(config.seed * 100_003 + epoch)).tolist()
    start = offset * config.batch
    return [order[(start + i) % count] for i in range(config.batch)]


def _lr_scale(step: int, config: FuserConfig) -> float:
    return min(1.0, (step + 1) / config.warmup_steps) if config.warmup_steps else 1.0


def _save(folder: Path, step: int, fuser, optimizer, history: list[dict], meta: dict, seconds: float) -> None:
    name = f"step-{step:06d}"
    with atomic_directory(folder / name) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in fuser.state_dict().items()}, tmp / "fuser.safetensors")
        torch.save({"optimizer": optimizer.state_dict(), "rng": rng_state()}, tmp / "state.pt")
        (tmp / "run.json").write_text(json.dumps({"step": step, "history": history, "meta": meta,
                                                  "seconds": seconds}, indent=1))
    atomic_write(folder / LATEST, name)
    for old in [*folder.glob("step-*"), *folder.glob(".step-*")]:
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)


def _resume(folder: Path, fuser, optimizer, meta: dict) -> tuple[int, list[dict], float]:
    if not (folder / LATEST).is_file():
        return 0, [], 0.0
    path = folder / (folder / LATEST).read_text().strip()
    try:
        run = json.loads((path / "run.json").read_text())
        weights = load_file(path / "fuser.safetensors")
        state = torch.load(path / "state.pt", weights_only=False, map_location="cpu")
    except (OSError, json.JSONDecodeError, RuntimeError) as error:
        raise CommError(f"fuser checkpoint {path}: cannot read it ({error})") from error
    if run["meta"] != meta:
        changed = sorted(k for k in set(meta) | set(run["meta"]) if meta.get(k) != run["meta"].get(k))
        raise CommError(f"fuser checkpoint {path}: made by another run (differs in {changed}); remove {folder} "
                        f"or use another folder")
    fuser.load_state_dict(weights)
    optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return run["step"], run["history"], run["seconds"]


def _step_loss(kind: str, receiver, sharer, module, examples: list) -> torch.Tensor:
    if kind == "fuser":
        batch = fusion_batch(examples, receiver.tokenizer, sharer.tokenizer, receiver.device)
        return fusion_loss(receiver.model, sharer.model, module, batch)
    batch = transfer_batch(examples, receiver.tokenizer, sharer.tokenizer, receiver.device)
    return transfer_loss(receiver.model, sharer.model, module, batch)


def train_fuser(receiver, sharer, examples: list, config: FuserConfig, folder=None, time_budget_s: float = 0.0,
                progress: bool | None = None, meta: dict | None = None, kind: str = "fuser") -> FuserRun:
    """Train a `kind` module for engines `receiver` <- `sharer` on examples with answers: FusionExample for a
    fuser, CommItem (context, question, answer) for a projector. `folder` keeps checkpoints (resume);
    `time_budget_s` > 0 stops (after a checkpoint) once that many seconds have passed."""
    if kind not in KINDS:
        raise CommError(f"train_fuser: kind expected one of {tuple(KINDS)}, found {kind!r}")
    if not examples or any(not ex.answer for ex in examples):
        raise CommError("train_fuser: expected examples that all have answers")
    device = receiver.device
    torch.manual_seed(config.seed)
    fuser = KINDS[kind](receiver.model.config, sharer.model.config, config.hidden).to(device)
    optimizer = torch.optim.AdamW(fuser.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    meta = {"kind": kind, "config": asdict(config), "examples": len(examples), "first_ids": [e.item_id for e in examples[:8]],
            **(meta or {})}
    meta = json.loads(json.dumps(meta, default=str))
    folder = Path(folder) if folder is not None else None
    step, history, spent = _resume(folder, fuser, optimizer, meta) if folder is not None else (0, [], 0.0)
    for model in (receiver.model, sharer.model):
        model.requires_grad_(False)
    fuser.train()
    began = time.perf_counter()
    bar = tqdm(total=config.steps, initial=step, desc=kind, disable=None if progress is None else not progress)
    while step < config.steps:
        if kind == "fuser":
            fuser.anneal(step / max(config.steps - 1, 1))
        for group in optimizer.param_groups:
            group["lr"] = config.lr * _lr_scale(step, config)
        loss = _step_loss(kind, receiver, sharer, fuser, [examples[i] for i in batch_order(len(examples), config,
                                                                                         step)])
        if not torch.isfinite(loss):
            raise CommError(f"{kind} step {step}: expected a finite loss, found {loss.item()}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(fuser.parameters(), config.clip)
        optimizer.step()
        step += 1
        history.append({"step": step, "loss": loss.item(), "grad_norm": norm.item()})
        if kind == "fuser":
            history[-1].update(temperature=fuser.temperature, gates_open=int((fuser.gate_logits > 0).sum()))
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}")
        elapsed = spent + time.perf_counter() - began
        out_of_time = time_budget_s > 0 and time.perf_counter() - began >= time_budget_s
        if folder is not None and (step % config.checkpoint_every == 0 or step == config.steps or out_of_time):
            _save(folder, step, fuser, optimizer, history, meta, elapsed)
        if out_of_time:
            break
    bar.close()
    fuser.eval()
    return FuserRun(fuser, history, step >= config.steps, spent + time.perf_counter() - began)


def export_fuser(run: FuserRun, folder, manifest: dict, train_ids: list[str]) -> Path:
    """Write fuser.safetensors (the module's weights, fuser or projector), manifest.json (with its kind, the
    run's config, seconds and loss curve) and train_ids.json into `folder`, atomically."""
    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        module = run.module
        save_file({k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}, tmp / "fuser.safetensors")
        kind = next(name for name, cls in KINDS.items() if isinstance(module, cls))
        body = {**manifest, "kind": kind, "hidden": module.hidden, "receiver_shape": list(module.receiver_shape),
                "sharer_shape": list(module.sharer_shape), "steps_done": len(run.history), "finished": run.finished,
                "train_seconds": run.seconds, "history": run.history}
        if kind == "fuser":
            body["gates"] = module.gates().tolist()
        (tmp / "manifest.json").write_text(json.dumps(body, indent=1, default=str))
        (tmp / "train_ids.json").write_text(json.dumps(train_ids))
    return folder


def load_fuser(folder, receiver_config, sharer_config, device="cpu", kind: str = "fuser") -> tuple:
    """The `kind` module (fuser or projector) exported by `export_fuser`, its manifest and training ids; the
    manifest's kind and shapes must match."""
    folder = Path(folder)
    try:
        manifest = json.loads((folder / "manifest.json").read_text())
        train_ids = json.loads((folder / "train_ids.json").read_text())
        weights = load_file(folder / "fuser.safetensors")
    except (OSError, json.JSONDecodeError) as error:
        raise CommError(f"fuser {folder}: expected fuser.safetensors, manifest.json and train_ids.json "
                        f"({error})") from error
    found = manifest.get("kind", "fuser")  # manifests written before projectors existed hold fusers
    if found != kind:
        raise CommError(f"{folder}: expected a {kind}, found a {found} (manifest.json kind)")
    fuser = KINDS[kind](receiver_config, sharer_config, manifest["hidden"])
    for side, shape in (("receiver", fuser.receiver_shape), ("sharer", fuser.sharer_shape)):
        if manifest.get(f"{side}_shape") != list(shape):
            raise CommError(f"{kind} {folder}: made for a {side} of (layers, KV heads, head dim) "
                            f"{manifest.get(f'{side}_shape')}, found {list(shape)}: it does not fit this pair")
    try:
        fuser.load_state_dict(weights)
    except RuntimeError as error:
        raise CommError(f"{kind} {folder}: its weights do not fit this pair ({str(error).splitlines()[0]})") from None
    return fuser.to(device).eval(), manifest, train_ids
