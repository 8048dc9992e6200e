"""Workloads of the experiments: synthetic token prompts for timing (content does not matter, lengths do) and
the fixed extraction prompt set of the cache-policy figures."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ember.errors import ParamsError, TaskError
from ember.models.lora import PROJECTIONS
from ember.params import check_device_name
from ember.tasks.evaluate import render
from ember.tasks.extraction import make_extraction, verify
from ember.train.tokens import Example


def random_prompts(vocab_size: int, count: int, length: int, seed: int, reserved: int = 4) -> list[list[int]]:
    """`count` prompts of exactly `length` token ids drawn from [reserved, vocab) (skipping special ids)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(reserved, vocab_size, (count, length), generator=generator)
    return ids.tolist()


def resolve_device(device: str) -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; 'cuda' or 'cuda:N' only where that device exists."""
    check_device_name(device)
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or 0)
        found = torch.cuda.device_count()
        if index >= found:
            raise ParamsError(f"device {device!r}: expected CUDA device {index} on this machine, found {found} "
                              f"CUDA device(s); use device=cpu or device=auto")
    return device


def check_lora_targets(params) -> None:
    """Raise ParamsError unless `params.targets` names one or more LoRA projections."""
    unknown = sorted(set(params.targets) - set(PROJECTIONS))
    if unknown or not params.targets:
        raise ParamsError(f"{type(params).__name__}.targets: expected names among {sorted(PROJECTIONS)}, found "
                          f"{list(params.targets)}")


def shared_prefix_documents(vocab_size: int, count: int, prompt_len: int, prefix_len: int, seed: int,
                            reserved: int = 4) -> list[list[int]]:
    """`count` prompts of `prompt_len` tokens that share their first `prefix_len` tokens and differ after."""
    if not 0 <= prefix_len < prompt_len:
        raise TaskError(f"prefix_len: expected 0 <= prefix_len < prompt_len ({prompt_len}), found {prefix_len}")
    generator = torch.Generator().manual_seed(seed)
    prefix = torch.randint(reserved, vocab_size, (prefix_len,), generator=generator)
    suffixes = torch.randint(reserved, vocab_size, (count, prompt_len - prefix_len), generator=generator)
    return [prefix.tolist() + row for row in suffixes.tolist()]


@dataclass(frozen=True)
class ExtractionSet:
    """A fixed extraction prompt set revisited every round: chat-rendered prompts (a shared instruction and
    schema prefix, then a document), their items, SFT examples on the gold JSON, and a verifier scorer."""

    items: tuple
    prompts: tuple[str, ...]
    examples: tuple

    def score(self, index: int, text: str) -> float:
        """Verifier reward in [0, 1] of a completion of prompt `index`."""
        return verify(self.items[index], text)["reward"]


def extraction_set(tokenizer, count: int, seed: int) -> ExtractionSet:
    """`count` seeded extraction items (seeds seed, seed+1, ...) rendered for `tokenizer`."""
    if count < 1:
        raise TaskError(f"extraction set: expected count >= 1, found {count}")
    items = tuple(make_extraction(seed + i) for i in range(count))
    prompts = tuple(render(tokenizer, item.messages()) for item in items)
    examples = tuple(Example.from_text(tokenizer, p, json.dumps(item.answer)) for p, item in zip(prompts, items))
    return ExtractionSet(items, prompts, examples)


RL_TASKS = ("extraction", "sql")


@dataclass(frozen=True)
class RLPromptSet:
    """The fixed prompt set an RL run revisits every round: one long shared prefix (instructions, schema, worked
    examples) in the system turn, each item last; gold answers as SFT examples; a verifier per item."""

    task: str
    items: tuple
    prompts: tuple[str, ...]
    examples: tuple
    reward: str = "weighted"

    def score(self, index: int, text: str) -> float:
        """Verifier reward in [0, 1] of a completion of prompt `index`."""
        return self.verify(index, text)["reward"]

    def verify(self, index: int, text: str) -> dict:
        """The verifier's full report on a completion of prompt `index`."""
        item = self.items[index]
        if self.task == "sql":
            from ember.tasks.sql import verify_sql

            return verify_sql(item, text)
        return verify(item, text, self.reward)

    def solved(self, index: int, text: str) -> bool:
        """Whether a completion is fully right (every field, or the same result set)."""
        report = self.verify(index, text)
        return report["match"] if self.task == "sql" else report["schema_valid"] and report["field_match"] == 1.0


def _extraction_system(shots: int) -> str:
    from ember.tasks.extraction import SCHEMA
    from ember.tasks.shared_prefix import INSTRUCTIONS

    worked = [make_extraction(10_000_000 + k) for k in range(shots)]  # seeds no prompt set uses
    examples = "".join(f"\nExample document: {w.document}\nExample answer: {json.dumps(w.answer)}\n" for w in worked)
    return f"{INSTRUCTIONS}\nSchema: {json.dumps(SCHEMA)}\n{examples}"


def rl_prompt_set(tokenizer, task: str, count: int, seed: int, reward: str = "weighted", shots: int = 2) -> RLPromptSet:
    """`count` items of `task` (seeds seed, seed+1, ...) behind one shared prefix with `shots` worked examples
    (extraction; the SQL prefix holds the database schema), rendered for `tokenizer`."""
    if task not in RL_TASKS:
        raise TaskError(f"RL task: expected one of {list(RL_TASKS)}, found {task!r}")
    if count < 1:
        raise TaskError(f"RL prompt set: expected count >= 1, found {count}")
    if task == "sql":
        from ember.tasks.sql import make_sql, sql_database

        database = sql_database(0)  # one database for every prompt: its schema is the shared prefix
        items = tuple(make_sql(seed + i, database) for i in range(count))
        messages = [item.messages() for item in items]
        answers = [item.gold_sql for item in items]
    else:
        system = _extraction_system(shots)
        items = tuple(make_extraction(seed + i) for i in range(count))
        messages = [[{"role": "system", "content": system}, {"role": "user", "content": f"Document: {i.document}"}]
                    for i in items]
        answers = [json.dumps(item.answer) for item in items]
    prompts = tuple(render(tokenizer, m) for m in messages)
    examples = tuple(Example.from_text(tokenizer, p, a) for p, a in zip(prompts, answers))
    return RLPromptSet(task, items, prompts, examples, reward)
