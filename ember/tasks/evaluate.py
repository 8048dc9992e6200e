"""Run a task's items through an engine (greedy) and score them: per-item correctness and accuracy with CI."""

from __future__ import annotations

from ember.engine import SamplingParams
from ember.tasks.metrics import accuracy


def render(tokenizer, messages: list[dict]) -> str:
    """Chat-template the messages when the tokenizer has a template, else join their contents."""
    if hasattr(tokenizer, "apply_chat_template") and getattr(tokenizer.hf, "chat_template", None):
        return tokenizer.apply_chat_template(messages)
    return "\n\n".join(m["content"] for m in messages) + "\n"


def evaluate(engine, items, score, max_tokens: int = 16, progress: bool | None = None) -> dict:
    """Greedy-generate an answer for each item (`item.messages()`), score it with `score(item, text)`.

    Returns {'accuracy', 'ci_low', 'ci_high', 'n', 'items': [{'output', 'correct'}, ...]}.
    """
    prompts = [render(engine.tokenizer, item.messages()) for item in items]
    result = engine.generate(prompts, sampling=SamplingParams(temperature=0, max_tokens=max_tokens),
                             progress=progress)
    outputs = [out.completions[0].text for out in result.outputs]
    flags = [bool(score(item, text)) for item, text in zip(items, outputs)]
    return {**accuracy(flags), "items": [{"output": o, "correct": f} for o, f in zip(outputs, flags)]}


def evaluate_benchmark(engine, task: str, split: str = "test", shots: int = 0, limit: int | None = None,
                       max_tokens: int | None = None, progress: bool | None = None) -> dict:
    """Accuracy (with a 95% Wilson interval) of greedy answers on a benchmark split. Few-shot examples come
    from the first `shots` records of the validation/dev split (or the split itself, skipped for scoring)."""
    from ember.tasks.datasets import SPLITS, load
    from ember.tasks.prompts import BenchmarkItem, score

    records = load(task, split)
    pool_split = next((s for s in ("dev", "validation") if s in SPLITS[task] and s != split), None)
    pool = load(task, pool_split) if pool_split else records
    examples = tuple(pool[:shots])
    if pool_split is None:
        records = records[shots:]
    items = [BenchmarkItem(r, examples) for r in records[:limit]]
    budget = max_tokens or (256 if task == "gsm8k" else 16)
    return {"task": task, "split": split, "shots": shots, **evaluate(engine, items, score, budget, progress)}
