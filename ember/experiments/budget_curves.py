"""fig7: budget curves. Accuracy against the bytes actually on the wire, for K/V transfer (token selection,
precision, RD allocation; every payload a measured KVWire blob) and for text at the same per-sample byte cap
(the raw context, the sharer's one-sentence hint), next to the receiver alone and the receiver reading the
context itself. One (receiver, sharer) pair and one task per run; the pair is params: `sharer` empty is the
Identical pair (the receiver as its own sharer). Context transfer across caches of other shapes goes through
a projector (`projector`: an exported folder, or trained in the run for `fuser_steps` steps)."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ember.comm.align import same_tokenizer
from ember.comm.data import EVAL_TASKS, check_disjoint, eval_examples, training_examples, transfer_training_items
from ember.comm.fusion_harness import FUSION_CAP_FREE, FUSION_METHODS, FusionHarness
from ember.comm.harness import CAP_FREE, TEXT_METHODS, Harness, method_grid, parse_method
from ember.comm.messages import cache_shape
from ember.comm.items import COMM_TASKS, comm_items, extraction_correct
from ember.comm.train_fuser import FuserConfig, load_fuser, train_fuser
from ember.engine import Engine
from ember.errors import CommError, ParamsError
from ember.experiments.cells import CellStore
from ember.experiments.workloads import resolve_device
from ember.params import RunParams, param
from ember.report import macro_name
from ember.tasks.metrics import wilson_interval
from ember.tasks.prompts import score as benchmark_score
from ember.tasks.recall import score as recall_score

MODES = ("context_transfer", "shared_context")
SHARED_TASKS = EVAL_TASKS


@dataclass(frozen=True)
class Params(RunParams):
    """The pair, the task and its items, the methods and the per-sample byte caps of fig7."""

    sharer: str = ""  # "" = the receiver itself (Identical pair)
    pair: str = "identical"  # the pair's name in plots and macros
    mode: str = param("context_transfer", choices=MODES)
    task: str = param("recall", choices=SHARED_TASKS)  # context transfer: recall or extraction
    items: int = param(4, low=1)
    facts: int = param(4, low=1, high=30)  # recall: facts in the context
    context_tokens: int = param(0, low=0)  # recall: distractors added up to this many context tokens
    caps: tuple[int, ...] = param((256, 4096), low=0)  # per-sample byte caps; full transfer is added by `full`
    full: bool = True
    methods: tuple[str, ...] = ("alone", "context", "text:raw", "kv:front:int8")
    max_tokens: int = param(8, low=1)
    hint_max_tokens: int = param(48, low=1)
    batch_size: int = param(16, low=1)
    fuser: str = ""  # shared context: an exported fuser folder (`ember fuser train`), or train one in the run:
    projector: str = ""  # context transfer across cache shapes: an exported projector folder, or train one:
    fuser_steps: int = param(0, low=0)  # steps of that in-run training of the fuser / projector (no folder)
    fuser_hidden: int = param(64, low=1)
    fuser_examples: int = param(64, low=1)
    fuser_recall_share: float = param(1.0, low=0.0, high=1.0)  # 1.0 needs no benchmark sets
    time_budget_s: float = param(0.0, low=0.0)  # stop (resumable) after this many seconds; 0 = no limit
    force: bool = False  # recompute finished cells

    def validate(self) -> None:
        super().validate()
        if self.mode == "context_transfer" and self.task not in COMM_TASKS:
            raise ParamsError(f"Params.task: context transfer expects one of {COMM_TASKS}, found {self.task!r}")
        if self.mode == "shared_context" and not self.fuser and not self.fuser_steps:
            raise ParamsError("Params.fuser: shared context expects a fuser folder or fuser_steps > 0, found neither")
        named = CAP_FREE + TEXT_METHODS if self.mode == "context_transfer" else FUSION_METHODS
        for spec in self.methods:
            if spec in named:
                continue
            if not spec.startswith(("kv:", "rd:")):
                raise ParamsError(f"Params.methods: {self.mode} expects one of {named} or kv:/rd: methods, "
                                  f"found {spec!r}")
            try:
                parse_method(spec)
            except CommError as error:
                raise ParamsError(f"Params.methods: {error}") from None
        if not any(m not in CAP_FREE + ("projection", "lora") for m in self.methods) and self.caps:
            raise ParamsError("Params.methods: expected at least one capped method (text or kv) for the caps")


def load_pair(params: Params, device: str) -> tuple[Engine, Engine]:
    """The receiver engine and the sharer engine (the same object for the Identical pair)."""
    receiver = Engine.load(params.model, dtype=params.dtype, device=device, seed=params.seed,
                           max_batch_size=params.batch_size, prefix_cache=False, progress=False)
    if not params.sharer or params.sharer == params.model:
        return receiver, receiver
    sharer = Engine.load(params.sharer, dtype=params.dtype, device=device, seed=params.seed + 1,
                         max_batch_size=params.batch_size, prefix_cache=False, progress=False)
    return receiver, sharer


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """Every method at every cap over the same seeded items: one row per (method, cap, item)."""
    device = resolve_device(params.device)
    receiver, sharer = load_pair(params, device)
    caps = list(params.caps) + ([None] if params.full else [])
    provenance = dict(receiver.provenance)
    if sharer is not receiver:
        provenance["sharer"] = sharer.provenance
    if params.mode == "context_transfer":
        count = (lambda text: len(receiver.tokenizer.encode(text))) if params.context_tokens else None
        items = comm_items(params.task, params.items, params.seed, facts=params.facts,
                           context_tokens=params.context_tokens, count_tokens=count)
        projector = None
        other = cache_shape(receiver) != cache_shape(sharer) or not same_tokenizer(receiver.tokenizer,
                                                                                    sharer.tokenizer)
        if other and any(m.startswith(("kv:", "rd:")) for m in params.methods):
            projector, projector_info = trained_module(params, receiver, sharer, "projector", progress)
            check_disjoint(projector_info.pop("train_ids"), [item.item_id for item in items])
            provenance["projector"] = projector_info
        harness = Harness(receiver, sharer, items, params.max_tokens, params.hint_max_tokens, params.seed, progress,
                          projector=projector)
    else:
        examples, scorers = eval_examples(params.task, params.items, params.seed, facts=params.facts)
        fuser, fuser_info = trained_module(params, receiver, sharer, "fuser", progress)
        check_disjoint(fuser_info.pop("train_ids"), [e.item_id for e in examples])
        provenance["fuser"] = fuser_info
        score = {"recall": recall_score, "extraction": extraction_correct}.get(params.task, benchmark_score)
        lora = Path(params.fuser) / "lora" if params.fuser and (Path(params.fuser) / "lora").is_dir() else None
        harness = FusionHarness(receiver, sharer, fuser, examples, scorers, score, params.max_tokens,
                                params.hint_max_tokens, params.batch_size, params.seed, progress, lora=lora)
    resolved = dataclasses.replace(params, device=device)  # cells of a CPU and a GPU run never mix
    keyed = dataclasses.replace(resolved, fuser=folder_digest(params.fuser), projector=folder_digest(params.projector))
    store = CellStore(keyed, params.time_budget_s, per_cell=("methods", "caps", "full"), force=params.force,
                      run_params=resolved)
    cap_free = CAP_FREE if params.mode == "context_transfer" else FUSION_CAP_FREE
    cells = {f"{method}@{cap}": (lambda m=method, c=cap: pd.DataFrame(harness.run([m], [c])))
             for method, cap in method_grid(list(params.methods), caps, cap_free)}
    df = store.run(cells, progress)
    df["pair"] = params.pair
    return df, {**provenance, "run_key": store.run_key}


def folder_digest(folder: str) -> str:
    """A trained module's folder with a digest of its manifest, so cells of a module retrained into the same
    folder are not reused ("" stays "")."""
    if not folder:
        return ""
    manifest = Path(folder) / "manifest.json"
    digest = hashlib.sha256(manifest.read_bytes()).hexdigest()[:12] if manifest.exists() else "none"
    return f"{folder}@{digest}"


def trained_module(params: Params, receiver, sharer, kind: str, progress) -> tuple:
    """The fuser (shared context) or projector (context transfer) of a run and what its manifest says (with
    its training ids): loaded from `params.fuser` / `params.projector`, or trained here for `fuser_steps`."""
    folder = params.fuser if kind == "fuser" else params.projector
    if folder:
        module, manifest, train_ids = load_fuser(folder, receiver.model.config, sharer.model.config,
                                                 receiver.device, kind=kind)
        info = {k: manifest.get(k) for k in ("pair", "hidden", "steps_done", "train_seconds", "git", "device")}
        return module, {"folder": folder, **info, "train_ids": train_ids}
    if not params.fuser_steps:
        raise ParamsError(f"Params.{kind}: the sharer's cache differs in shape or tokens from the receiver's; "
                          f"expected a {kind} folder or fuser_steps > 0, found neither")
    if kind == "fuser":
        examples = training_examples(params.fuser_examples, params.seed, params.fuser_recall_share, params.facts)
    else:
        count = (lambda text: len(receiver.tokenizer.encode(text))) if params.context_tokens else None
        examples = transfer_training_items(params.fuser_examples, params.seed, 0.0 if params.task == "recall"
                                           else 1.0, params.facts, params.context_tokens, count)
    config = FuserConfig(hidden=params.fuser_hidden, steps=params.fuser_steps, batch=min(8, len(examples)),
                         seed=params.seed)
    run = train_fuser(receiver, sharer, examples, config, progress=progress, kind=kind)
    return run.module, {"trained_in_run": True, "hidden": config.hidden, "steps_done": len(run.history),
                       "train_seconds": run.seconds, "final_loss": run.history[-1]["loss"],
                       "train_ids": [e.item_id for e in examples]}


def summarize(df: pd.DataFrame, by: tuple[str, ...] = ()) -> pd.DataFrame:
    """Per (*by, method, cap): accuracy with its 95% Wilson interval, mean and max bytes sent, tokens sent,
    truncation rate and mean times. Cap NaN is full transfer (or a cap-free method)."""
    df = df.assign(cap=df["cap"].astype("float64"))
    rows = []
    for key, part in df.groupby([*by, "method", "cap"], dropna=False, sort=False):
        *outer, method, cap = key
        correct, n = int(part["correct"].sum()), len(part)
        low, high = wilson_interval(correct, n)
        row = {**dict(zip(by, outer)), "method": method, "family": part["family"].iloc[0], "cap": cap, "n": n,
               "accuracy": correct / n,
               "ci_low": low, "ci_high": high, "bytes_mean": part["bytes"].mean(), "bytes_max": part["bytes"].max(),
               "tokens_sent": part["tokens_sent"].mean(), "truncated_rate": part["truncated"].astype(float).mean()}
        for col in ("encode_ms", "decode_ms", "select_ms", "receiver_ms", "e2e_ms"):
            row[col] = part[col].mean() if col in part else float("nan")
        rows.append(row)
    return pd.DataFrame(rows)


def _is_cache(method: str) -> bool:
    return method.split(":")[0] in ("kv", "rd")


def compare(summary: pd.DataFrame) -> pd.DataFrame:
    """Per cap (full transfer last, as cap NaN): the best cache method and the best text baseline, their
    accuracies, whether the cache beats text there, and whether their 95% intervals are apart (a win beyond
    sampling noise)."""
    capped = summary[summary["method"].map(lambda m: m not in CAP_FREE)]
    rows = []
    for cap, part in capped.groupby("cap", dropna=False, sort=True):
        cache, text = part[part["method"].map(_is_cache)], part[part["method"].isin(TEXT_METHODS)]
        if cache.empty or text.empty:
            continue
        best_cache, best_text = cache.loc[cache["accuracy"].idxmax()], text.loc[text["accuracy"].idxmax()]
        rows.append({"cap": cap, "cache_method": best_cache["method"], "cache_accuracy": best_cache["accuracy"],
                     "text_method": best_text["method"], "text_accuracy": best_text["accuracy"],
                     "cache_beats_text": bool(best_cache["accuracy"] > best_text["accuracy"]),
                     "intervals_apart": bool(best_cache["ci_low"] > best_text["ci_high"])})
    return pd.DataFrame(rows)


def macros(summary: pd.DataFrame, params: Params) -> dict:
    """The smallest cap at which the best cache method beats the best text baseline ('none' if no cap), the
    accuracy gap (points) at full transfer, and the best accuracies of each side at every cap; names carry
    the pair and the mode (transfer / fusion)."""
    target, task = params.target or "fig7", params.task
    pair = f"{params.pair} {'transfer' if params.mode == 'context_transfer' else 'fusion'}"
    table = compare(summary)
    values = {}
    wins = table[table["cache_beats_text"] & table["cap"].notna()]
    values[macro_name(target, pair, task, "cache beats text cap")] = (
        str(int(wins["cap"].min())) if not wins.empty else "none")
    clear = wins[wins["intervals_apart"]]
    values[macro_name(target, pair, task, "cache clearly beats text cap")] = (
        str(int(clear["cap"].min())) if not clear.empty else "none")
    full = table[table["cap"].isna()]
    if not full.empty:
        gap = 100 * (full["cache_accuracy"].iloc[0] - full["text_accuracy"].iloc[0])
        values[macro_name(target, pair, task, "full gap")] = float(gap)
    for row in table.itertuples():
        cap = "full" if row.cap is None or math.isnan(row.cap) else int(row.cap)
        values[macro_name(target, pair, task, "cache", cap)] = 100 * float(row.cache_accuracy)
        values[macro_name(target, pair, task, "text", cap)] = 100 * float(row.text_accuracy)
    for method in CAP_FREE + ("projection", "lora"):
        part = summary[summary["method"] == method]
        if not part.empty:
            values[macro_name(target, pair, task, method)] = 100 * float(part["accuracy"].iloc[0])
    return values
