"""A replayable training trajectory: `steps` SFT steps, the adapter saved after each one (PEFT directories), so
figures replay the same real sequence of updates under every cache policy. A finished trajectory of the same
configuration is loaded instead of trained again."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from ember.models.lora import LoraAdapter
from ember.models.versions import model_fingerprint
from ember.report import atomic_write
from ember.train.config import TrainConfig
from ember.train.sft import SFTTrainer
from ember.train.tokens import Example

DONE_FILE = "trajectory.json"


def trajectory(model, config: TrainConfig, examples: list[Example], steps: int, batch_size: int, folder: Path,
               pad_id: int = 0, progress: bool | None = None) -> list[LoraAdapter]:
    """The adapters after steps 1..steps of SFT on `examples` (cycled in batches of `batch_size`), trained on
    `model` in place or loaded from `folder` when a finished trajectory of this exact setup is there."""
    folder = Path(folder)
    key = hashlib.sha256(json.dumps({"config": asdict(config), "steps": steps, "batch": batch_size,
                                     "examples": [[e.prompt, e.answer] for e in examples],
                                     "model": model_fingerprint(model)}, sort_keys=True).encode()).hexdigest()[:16]
    done = folder / DONE_FILE
    if done.exists() and json.loads(done.read_text()).get("key") == key:
        return [LoraAdapter.load(folder / f"step-{i:04d}", model) for i in range(1, steps + 1)]
    trainer = SFTTrainer(model, config, pad_id)
    adapters, losses = [], []
    for step in tqdm(range(steps), desc="sft", disable=None if progress is None else not progress, leave=False):
        start = step * batch_size % len(examples)
        batch = [examples[(start + j) % len(examples)] for j in range(batch_size)]
        losses.append(trainer.step(batch)["loss"])
        trainer.save(folder / f"step-{step + 1:04d}")
        adapters.append(trainer.adapter.to())
    atomic_write(done, json.dumps({"key": key, "steps": steps, "losses": losses}, indent=2))
    return adapters


def losses(folder: Path) -> list[float]:
    """Training losses recorded with a finished trajectory."""
    return json.loads((Path(folder) / DONE_FILE).read_text())["losses"]
