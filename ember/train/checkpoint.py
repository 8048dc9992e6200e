"""Per-round checkpoints of the RL loop: the adapter (a PEFT directory), the optimizer, the RNG states, the round
reached, the rows recorded so far and the cache policy's state (counters and the prefix cache's blocks).

Each checkpoint is written to its own folder (round-NNNN, atomically), then the LATEST file (atomically) names
it, then older folders are removed: a crash at any point leaves the previous checkpoint whole."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import torch

from ember.errors import TrainError
from ember.models.lora import LoraAdapter
from ember.report import atomic_directory, atomic_write

LATEST = "LATEST"


def rng_state() -> dict:
    """The Python, torch and (where present) CUDA generator states."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    """Restore the states `rng_state` returned."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(folder, round_index: int, trainer, runner, rows: list[dict], meta: dict) -> Path:
    """Write the checkpoint after round `round_index` (rounds 0.. done) and make it the latest."""
    folder = Path(folder)
    name = f"round-{round_index:04d}"
    with atomic_directory(folder / name) as tmp:
        trainer.save(tmp / "adapter")
        torch.save({"trainer": trainer.state_dict(), "rng": rng_state(), "runner": runner.state()},
                   tmp / "state.pt")
        (tmp / "loop.json").write_text(json.dumps({"round": round_index, "rows": rows, "meta": meta},
                                                  indent=1, default=str))
    atomic_write(folder / LATEST, name)
    for old in [*folder.glob("round-*"), *folder.glob(".round-*")]:  # older checkpoints, a killed run's temp folders
        if old.name != name:
            shutil.rmtree(old, ignore_errors=True)
    return folder / name


def load_checkpoint(folder, trainer, runner, meta: dict) -> tuple[int, list[dict]] | None:
    """Restore trainer, runner and RNG from the latest checkpoint in `folder`; (last round done, rows so far),
    or None when there is none. `meta` must equal the one saved (else the checkpoint is of another run)."""
    folder = Path(folder)
    if not (folder / LATEST).is_file():
        return None
    path = folder / (folder / LATEST).read_text().strip()
    try:
        loop = json.loads((path / "loop.json").read_text())
        state = torch.load(path / "state.pt", weights_only=False, map_location="cpu")
    except (OSError, json.JSONDecodeError, RuntimeError) as error:
        raise TrainError(f"checkpoint {path}: expected loop.json and state.pt, cannot read them ({error})") from error
    saved = json.loads(json.dumps(meta, default=str))
    if loop["meta"] != saved:
        changed = sorted(k for k in set(saved) | set(loop["meta"]) if saved.get(k) != loop["meta"].get(k))
        raise TrainError(f"checkpoint {path}: made by another run (differs in {changed}); remove {folder} or "
                         f"use another folder")
    model = trainer.model
    adapter = LoraAdapter.load(path / "adapter", model, device=model.output_weight.device,
                               dtype=model.output_weight.dtype)
    trainer.restore(adapter, state["trainer"])
    runner.restore(state["runner"], adapter)
    set_rng_state(state["rng"])
    return loop["round"], loop["rows"]
