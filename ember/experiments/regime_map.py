"""fig8: the regime map. Where sending K/V beats sending text under a per-sample byte cap, and why.

Cells are pair x task x context bucket x byte cap. Each item's context is padded with pinned filler to a
bucket of receiver tokens (ember.comm.long_context); every method answers the same items at every cap through
the equal-byte harness (KVWire blobs measured, text cut at a UTF-8 boundary). Per cell the best cache method
meets the best text baseline (ties broken by fewer bytes, then lower latency, logged), with a paired bootstrap
95% interval of their accuracy difference; per (pair, task, bucket) the bytes each side needs to reach a
target accuracy and the cap where the winner flips. The closest call per pair is re-run on other shards of
items (fresh seeds) so its interval can be read twice.

Execution: every finished (pair, task, bucket, shard, method, cap) is stored under reports/fig8/cells/ keyed
by a hash of its config and of ember's code, so a sweep resumes after a crash or across GPU runs (`force`
recomputes). Sequential by default, one (pair, task, bucket, shard) group at a time: the pair's sharer
computes every missing message of the group (blobs in reports/fig8/wire_blobs/, stable names) and is unloaded
before the receiver loads and applies them; a receiver that crashes resumes from the saved blobs without the
sharer. A group's blobs are removed once its cells are stored (`keep_blobs` keeps them).
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import hashlib
import json
import math
import shutil
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from ember.comm.data import check_disjoint
from ember.comm.harness import CAP_FREE, TEXT_METHODS, Harness, parse_method, sharer_pass
from ember.comm.items import COMM_TASKS
from ember.comm.long_context import FILLER_VERSION, long_items
from ember.comm.messages import SharerSide, StoredMessages
from ember.comm.train_fuser import load_fuser
from ember.engine import Engine
from ember.errors import CommError, ParamsError, ReportError
from ember.experiments.budget_curves import summarize
from ember.experiments.cells import CellStore
from ember.experiments.workloads import resolve_device
from ember.models.loader import load_config, load_spec_tokenizer
from ember.params import RunParams, param
from ember.report import macro_name, report_dir

CACHE_FAMILIES = ("kv", "rd")
BASELINE_FAMILIES = ("kvcomm", "qkvcomm")  # the layer-wise published baselines (ember.comm.layer_baselines)
CALIBRATION_SEED = 1_000_000  # calibration items' seeds start here, far from every evaluated shard's
GROUP = ("pair", "task", "context_len_bucket", "shard")
# Params the cells' names carry, or that only analyse or schedule: left out of the run's key.
PER_CELL = ("pairs", "sharers", "projectors", "tasks", "buckets", "caps", "full", "methods", "stability_shards",
            "target_accuracy", "bootstrap", "sequential", "keep_blobs")


@dataclass(frozen=True)
class Params(RunParams):
    """Pairs (name, sharer model, projector folder), tasks, context buckets and caps of fig8."""

    pairs: tuple[str, ...] = ("identical",)
    sharers: tuple[str, ...] = ("",)  # "" = the receiver itself
    projectors: tuple[str, ...] = ("",)  # an exported projector folder where the caches differ in shape
    tasks: tuple[str, ...] = param(("recall",), choices=COMM_TASKS)
    buckets: tuple[int, ...] = param((512,), low=16)  # context tokens each item is padded to
    caps: tuple[int, ...] = param((256, 4096), low=0)
    full: bool = True
    methods: tuple[str, ...] = ("alone", "context", "text:raw", "text:hint", "kv:front:int8", "rd:vnorm:int4+int8")
    items: int = param(4, low=1)
    facts: int = param(4, low=1, high=30)
    max_tokens: int = param(8, low=1)
    hint_max_tokens: int = param(48, low=1)
    calibration_items: int = param(4, low=1)  # items (never evaluated) that rank layers for kvcomm: methods
    batch_size: int = param(16, low=1)
    target_accuracy: float = param(0.5, low=0.0, high=1.0)  # "bytes to reach" this accuracy
    bootstrap: int = param(1000, low=10)  # resamples of the paired accuracy difference
    stability_shards: int = param(1, low=0)  # other shards of items the closest call per pair is re-run on
    sequential: bool = True  # per group: sharer first (blobs saved, sharer unloaded), then the receiver
    keep_blobs: bool = False  # keep a group's wire blobs after its cells are stored (they can be large)
    force: bool = False  # recompute finished cells
    time_budget_s: float = param(0.0, low=0.0)  # stop (resumable) after this many seconds; 0 = no limit

    def validate(self) -> None:
        super().validate()
        if not len(self.pairs) == len(self.sharers) == len(self.projectors):
            raise ParamsError(f"Params.pairs/sharers/projectors: expected one sharer and one projector per pair, "
                              f"found {len(self.pairs)}, {len(self.sharers)}, {len(self.projectors)}")
        if len(set(self.pairs)) != len(self.pairs):
            raise ParamsError(f"Params.pairs: expected distinct names, found {list(self.pairs)}")
        for spec in self.methods:
            if spec in CAP_FREE + TEXT_METHODS:
                continue
            try:
                parse_method(spec)
            except CommError as error:
                raise ParamsError(f"Params.methods: {error}") from None
        families = {family(m) for m in self.methods}
        if not families & {"cache"} or not families & {"text"}:
            raise ParamsError(f"Params.methods: the regime map compares cache with text; expected at least one "
                              f"kv:/rd: method and one of {TEXT_METHODS}, found {list(self.methods)}")


def family(method: str) -> str:
    """'cache' (kv:/rd:), 'text' (text baselines), 'kvcomm' / 'qkvcomm' (the layer-wise baselines) or the
    cap-free method's own name."""
    kind = method.split(":")[0]
    if kind in CACHE_FAMILIES:
        return "cache"
    if kind in BASELINE_FAMILIES:
        return kind
    return "text" if method in TEXT_METHODS else method


def _cap_list(params: Params) -> list[int | None]:
    return list(params.caps) + ([None] if params.full else [])


def _cell_name(pair: str, sharer: str, projector: str, task: str, bucket: int, shard: int, method: str,
               cap: int | None) -> str:
    return json.dumps({"pair": pair, "sharer": sharer, "projector": projector, "task": task, "bucket": bucket,
                       "shard": shard, "method": method, "cap": cap}, sort_keys=True)


class _Pairs:
    """Loads and unloads the engines of a sweep: the receiver kept across groups, a sharer only for its pass."""

    def __init__(self, params: Params, device: str):
        self.params, self.device = params, device
        self.receiver = None
        self._receiver_tokenizer = None
        self.live_sharers: dict[int, Engine] = {}  # simultaneous runs: sharers kept beside the receiver
        self.provenance: dict = {}

    def _load(self, spec: str, seed: int) -> Engine:
        p = self.params
        return Engine.load(spec, dtype=p.dtype, device=self.device, seed=seed, max_batch_size=p.batch_size,
                           prefix_cache=False, progress=False)

    def get_receiver(self) -> Engine:
        if self.receiver is None:
            self.receiver = self._load(self.params.model, self.params.seed)
            self.provenance["receiver"] = self.receiver.provenance
        return self.receiver

    def receiver_tokenizer(self):
        """The receiver's tokenizer, loaded without its weights once per sweep."""
        if self._receiver_tokenizer is None:
            self._receiver_tokenizer = load_spec_tokenizer(self.params.model)
        return self._receiver_tokenizer

    def drop_receiver(self) -> None:
        self.receiver = None
        self.live_sharers.clear()
        _free_memory()

    def live_sharer(self, index: int) -> Engine:
        """The sharer beside the receiver in a simultaneous run (the receiver itself for the Identical pair)."""
        spec = self.params.sharers[index]
        if not spec or spec == self.params.model:
            return self.get_receiver()
        if index not in self.live_sharers:
            self.live_sharers[index] = self.sharer(index)
        return self.live_sharers[index]

    def sharer(self, index: int) -> Engine:
        """The pair's sharer engine (a fresh load, also for the Identical pair in a sequential run)."""
        spec = self.params.sharers[index] or self.params.model
        engine = self._load(spec, self.params.seed + 1 if self.params.sharers[index] else self.params.seed)
        self.provenance[f"sharer:{self.params.pairs[index]}"] = engine.provenance
        return engine

    def projector(self, index: int, device):
        """The pair's projector (None without one), loaded for the receiver and sharer configs."""
        folder = self.params.projectors[index]
        if not folder:
            return None
        receiver = load_config(self.params.model)
        sharer = load_config(self.params.sharers[index] or self.params.model)
        module, manifest, train_ids = load_fuser(folder, receiver, sharer, device, kind="projector")
        self.provenance[f"projector:{self.params.pairs[index]}"] = {"folder": folder, "git": manifest.get("git")}
        module.train_ids = train_ids
        return module


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def run(params: Params, progress: bool | None = None) -> tuple[pd.DataFrame, dict]:
    """Every cell of the grid (stored cells reused), then the stability re-runs of each pair's closest call:
    one row per (pair, task, bucket, shard, method, cap, item)."""
    device = resolve_device(params.device)
    keyed = dataclasses.replace(params, device=device)  # cells of a CPU and a GPU run never mix
    store = CellStore(keyed, params.time_budget_s, per_cell=PER_CELL, force=params.force)
    pairs = _Pairs(params, device)
    main = [(i, task, bucket, 0) for i in range(len(params.pairs)) for task in params.tasks
            for bucket in params.buckets]
    plan = {group: list(params.methods) for group in main}
    df = _run_groups(params, store, pairs, plan, progress)
    if params.stability_shards:
        extra = {}
        for (i, task, bucket, cap), methods in closest_calls(df, params).items():
            for shard in range(1, params.stability_shards + 1):
                extra.setdefault((i, task, bucket, shard), {"methods": methods, "caps": set()})["caps"].add(cap)
        if extra:
            df = pd.concat([df, _run_groups(params, store, pairs, extra, progress)], ignore_index=True)
    pairs.drop_receiver()
    provenance = {**pairs.provenance, "device": device, "filler": FILLER_VERSION, "run_key": store.run_key}
    return df, provenance


def _group_cells(params: Params, group: tuple, spec) -> list[tuple[str, str, int | None]]:
    """(cell name, method, cap) of one group: every method at every cap, or a stability group's few."""
    i, task, bucket, shard = group
    methods, caps = (spec, _cap_list(params)) if isinstance(spec, list) else (spec["methods"], sorted(
        spec["caps"], key=lambda c: math.inf if c is None else c))
    cells = []
    for method in methods:
        for cap in ([None] if method in CAP_FREE else caps):
            name = _cell_name(params.pairs[i], params.sharers[i], params.projectors[i], task, bucket, shard,
                              method, cap)
            cells.append((name, method, cap))
    return cells


def _run_groups(params: Params, store: CellStore, pairs: _Pairs, plan: dict, progress) -> pd.DataFrame:
    """The rows of every cell of the planned groups, one group at a time; a group's missing cells are
    computed (sequential: its sharer pass first, its blobs removed once its cells are stored unless
    `keep_blobs`), each cell stored as it finishes."""
    frames = []
    for group, spec in plan.items():
        cells = _group_cells(params, group, spec)
        missing = set(store.missing([name for name, _, _ in cells]))
        if missing and store.should_stop():
            raise ReportError(f"{params.target or 'fig8'}: time_budget_s={store.budget:g} spent with cells left; the "
                              f"finished ones are stored in {store.folder}: run again to continue")
        if missing and params.sequential:
            if params.force:  # recompute the messages too, not only the cells
                shutil.rmtree(_blob_folder(params, group, store.run_key), ignore_errors=True)
            _sharer_pass(params, pairs, group, [c for c in cells if c[0] in missing], store.run_key)
        contexts = {}
        computes = {name: (lambda m=method, c=cap: _compute(params, pairs, group, m, c, contexts, store.run_key))
                    for name, method, cap in cells}
        frames.append(store.run(computes, progress))
        del computes, contexts  # the group's harness holds the receiver: free it before the next sharer pass
        if missing and params.sequential and not params.keep_blobs:
            shutil.rmtree(_blob_folder(params, group, store.run_key), ignore_errors=True)
    return pd.concat(frames, ignore_index=True)


def _blob_folder(params: Params, group: tuple, run_key: str):
    """A group's wire-blob folder, named by the run's key (params and ember's code) and the pair's models, so
    blobs of other settings or other code are never reused."""
    i, task, bucket, shard = group
    key = json.dumps({"run": run_key, "sharer": params.sharers[i], "projector": params.projectors[i],
                      "filler": FILLER_VERSION}, sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return report_dir(params.target or "fig8") / "wire_blobs" / f"{params.pairs[i]}-{task}-{bucket}-s{shard}-{digest}"


@functools.lru_cache(maxsize=4)
def _token_counter(tokenizer):
    """One counting function per tokenizer (long_items caches the filler's costs per function)."""
    return lambda text: len(tokenizer.encode(text))


def _items(params: Params, group: tuple, tokenizer):
    _, task, bucket, shard = group
    return long_items(task, params.items, params.seed + shard * params.items, bucket, _token_counter(tokenizer),
                      params.facts)


def _calibration(params: Params, group: tuple, tokenizer, methods, evaluated: list) -> list:
    """The items that rank layers for kvcomm: methods (none when no such method runs), seeded apart from
    every evaluated shard and checked disjoint from `evaluated` items."""
    if not any(family(m) == "kvcomm" for m in methods):
        return []
    _, task, bucket, _ = group
    items = [x.item for x in long_items(task, params.calibration_items, params.seed + CALIBRATION_SEED, bucket,
                                        _token_counter(tokenizer), params.facts)]
    shared = sorted({i.item_id for i in items} & {i.item_id for i in evaluated})
    if shared:
        raise CommError(f"calibration items: expected none among the evaluated items, found {shared[:3]}")
    return items


def _sharer_pass(params: Params, pairs: _Pairs, group: tuple, cells: list, run_key: str) -> None:
    """Every message a group's missing cells need, computed by its pair's sharer and saved; the sharer is
    then unloaded (and the receiver before it, so the two are never loaded together)."""
    pairs.drop_receiver()
    sharer = pairs.sharer(group[0])
    projector = pairs.projector(group[0], sharer.device)
    receiver_tokenizer = pairs.receiver_tokenizer()
    items = [x.item for x in _items(params, group, receiver_tokenizer)]
    methods = sorted({m for _, m, _ in cells if m not in CAP_FREE + ("text:raw",)})
    calibration = _calibration(params, group, receiver_tokenizer, methods, items)
    stored = StoredMessages(_blob_folder(params, group, run_key),
                            SharerSide(sharer, projector, params.seed, params.hint_max_tokens, calibration,
                                       receiver_tokenizer=receiver_tokenizer))
    caps = sorted({c for _, m, c in cells if m not in CAP_FREE}, key=lambda c: math.inf if c is None else c)
    sharer_pass(stored, items, receiver_tokenizer, methods, caps)
    stored.release()
    del sharer, projector, stored
    _free_memory()


def _compute(params: Params, pairs: _Pairs, group: tuple, method: str, cap: int | None, contexts: dict,
             run_key: str) -> pd.DataFrame:
    """One cell's rows, through the group's harness (made once per group, on the receiver)."""
    if not contexts:
        receiver = pairs.get_receiver()
        items = _items(params, group, receiver.tokenizer)
        index = group[0]
        projector = pairs.projector(index, receiver.device)
        if projector is not None:
            check_disjoint(projector.train_ids, [x.item.item_id for x in items])
        if params.sequential:
            messages = StoredMessages(_blob_folder(params, group, run_key))
            harness = Harness(receiver, None, [x.item for x in items], params.max_tokens, params.hint_max_tokens,
                              params.seed, False, projector=projector, messages=messages)
        else:
            calibration = _calibration(params, group, receiver.tokenizer, params.methods, [x.item for x in items])
            harness = Harness(receiver, pairs.live_sharer(index), [x.item for x in items], params.max_tokens,
                              params.hint_max_tokens, params.seed, False, projector=projector,
                              calibration=calibration)
        contexts.update(harness=harness, fact_position={x.item.item_id: x.fact_position for x in items})
    harness, fact_position = contexts["harness"], contexts["fact_position"]
    df = pd.DataFrame(harness.run([method], [cap]))
    pair, task, bucket, shard = params.pairs[group[0]], *group[1:]
    df["pair"], df["context_len_bucket"], df["shard"] = pair, bucket, shard
    df["fact_position"] = df["item_id"].map(fact_position)
    return df


# ---- analysis ------------------------------------------------------------------------------------------

def best_of(part: pd.DataFrame) -> tuple[pd.Series, str]:
    """The best method of a family at one cell: highest accuracy, ties to fewer mean bytes, then lower mean
    end-to-end latency, then the method's name (so equal measurements never pick by accident); and which rule
    decided."""
    ranked = part.sort_values(["accuracy", "bytes_mean", "e2e_ms", "method"], ascending=[False, True, True, True])
    top = ranked.iloc[0]
    if len(ranked) == 1:
        return top, "accuracy"
    second = ranked.iloc[1]
    for rule, column in (("accuracy", "accuracy"), ("bytes", "bytes_mean"), ("latency", "e2e_ms")):
        if second[column] != top[column]:
            return top, rule
    return top, "name"


def paired_bootstrap(a: np.ndarray, b: np.ndarray, resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of mean(a) - mean(b) over items resampled together (a, b: per-item 0/1)."""
    if len(a) != len(b) or not len(a):
        raise CommError(f"paired bootstrap: expected two equal, non-empty item sets, found {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(a), size=(resamples, len(a)))
    diffs = a[picks].mean(axis=1) - b[picks].mean(axis=1)
    return float(np.quantile(diffs, 0.025)), float(np.quantile(diffs, 0.975))


def exact_mcnemar(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value of paired 0/1 outcomes: a binomial test on the items where they differ."""
    wins, losses = int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    n = wins + losses
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(wins, losses) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def regime_table(df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per (pair, task, bucket, shard, cap): best cache vs best text method, their accuracies, bytes and
    latencies, the tie-break rule each needed, the accuracy difference (points) with its paired bootstrap
    95% interval, the exact McNemar p-value, and the winner: 'cache' / 'text' when the interval excludes 0
    and p < 0.05 (the bootstrap alone is too generous on a few items), else 'tie'."""
    summary = summarize(df, by=GROUP)
    rows = []
    for key, part in summary.groupby([*GROUP, "cap"], dropna=False, sort=True):
        families = part["method"].map(family)
        cache, text = part[families == "cache"], part[families == "text"]
        if cache.empty or text.empty:
            continue
        (best_cache, cache_rule), (best_text, text_rule) = best_of(cache), best_of(text)
        cell = df[(df[list(GROUP)] == pd.Series(dict(zip(GROUP, key[:4])))).all(axis=1)]
        cap = key[4]
        at_cap = cell[cell["cap"].isna()] if pd.isna(cap) else cell[cell["cap"] == cap]
        flags = {m: at_cap[at_cap["method"] == m].sort_values("item_id")["correct"].to_numpy(float)
                 for m in (best_cache["method"], best_text["method"])}
        low, high = paired_bootstrap(flags[best_cache["method"]], flags[best_text["method"]], params.bootstrap,
                                     params.seed)
        diff = best_cache["accuracy"] - best_text["accuracy"]
        p_value = exact_mcnemar(flags[best_cache["method"]], flags[best_text["method"]])
        apart = p_value < 0.05
        rows.append({**dict(zip(GROUP, key[:4])), "cap": cap,
                     "cache_method": best_cache["method"], "cache_accuracy": best_cache["accuracy"],
                     "cache_bytes": best_cache["bytes_mean"], "cache_e2e_ms": best_cache["e2e_ms"],
                     "cache_tie_break": cache_rule,
                     "text_method": best_text["method"], "text_accuracy": best_text["accuracy"],
                     "text_bytes": best_text["bytes_mean"], "text_e2e_ms": best_text["e2e_ms"],
                     "text_tie_break": text_rule,
                     "diff_points": 100 * diff, "diff_low": 100 * low, "diff_high": 100 * high,
                     "p_value": p_value,
                     "winner": "cache" if low > 0 and apart else "text" if high < 0 and apart else "tie"})
    return pd.DataFrame(rows)


def closest_calls(df: pd.DataFrame, params: Params) -> dict:
    """Per pair, the main-shard cell with the smallest |difference| between two methods that are not both
    perfect or both at zero (any cell where every one is): {(pair index, task, bucket, cap): [best cache
    method, best text method]}."""
    table = regime_table(df[df["shard"] == 0], params)
    out = {}
    for pair, part in table.groupby("pair", sort=False):
        informative = part[~((part["cache_accuracy"] == part["text_accuracy"])
                             & part["cache_accuracy"].isin([0.0, 1.0]))]
        if informative.empty:  # every cell all right or all wrong on both sides: re-run the smallest cap
            informative = part
        row = informative.loc[(informative["diff_points"].abs()).idxmin()]
        cap = None if pd.isna(row["cap"]) else int(row["cap"])
        out[(list(params.pairs).index(pair), row["task"], int(row["context_len_bucket"]), cap)] = [row["cache_method"],
                                                                                      row["text_method"]]
    return out


def flips(table: pd.DataFrame, df: pd.DataFrame, params: Params) -> pd.DataFrame:
    """Per (pair, task, bucket) of the main shard: the smallest cap where the cache wins beyond noise, where
    it is ahead at all, the cap where the winner flips (the first cap after which the sign of the difference
    changes), and the fewest mean bytes any method of each side needs to reach `target_accuracy` (from the
    rows `df`; NaN: never within the caps)."""
    rows = []
    main = table[table["shard"] == 0]
    summary = summarize(df[df["shard"] == 0], by=GROUP)
    for key, part in main.groupby(["pair", "task", "context_len_bucket"], sort=False):
        capped = part[part["cap"].notna()].sort_values("cap")
        flip, leader = None, 0.0  # the first cap whose leader differs from the last cap that had one
        for cap, sign in zip(capped["cap"], np.sign(capped["diff_points"].to_numpy())):
            if sign and leader and sign != leader and flip is None:
                flip = int(cap)
            leader = sign or leader
        reach = {}
        mine = summary[(summary["pair"] == key[0]) & (summary["task"] == key[1])
                       & (summary["context_len_bucket"] == key[2])]
        for side in ("cache", "text"):
            ok = mine[(mine["method"].map(family) == side) & (mine["accuracy"] >= params.target_accuracy)]
            reach[f"{side}_bytes_to_target"] = float(ok["bytes_mean"].min()) if not ok.empty else float("nan")
        wins = capped[capped["winner"] == "cache"]
        ahead = capped[capped["diff_points"] > 0]
        rows.append({"pair": key[0], "task": key[1], "context_len_bucket": key[2],
                     "cache_wins_from": int(wins["cap"].min()) if not wins.empty else None,
                     "cache_ahead_from": int(ahead["cap"].min()) if not ahead.empty else None,
                     "flip_cap": flip, "cache_wins": int((part["winner"] == "cache").sum()),
                     "text_wins": int((part["winner"] == "text").sum()), "ties": int((part["winner"] == "tie").sum()),
                     **reach})
    return pd.DataFrame(rows)


def why(df: pd.DataFrame, table: pd.DataFrame) -> pd.DataFrame:
    """Per main-shard cell, what the best cache method's bytes are made of (mean header / indices / map /
    payload / scales / checksum bytes), which layers hold them (`layer_dominance`), the fraction of context
    tokens it kept, and the end-to-end latency of cache and text (the hint's generation counts on the text
    side)."""
    rows = []
    parts = ("header", "indices", "map", "payload", "scales", "checksum")
    for row in table[table["shard"] == 0].itertuples():
        sel = (df["pair"] == row.pair) & (df["task"] == row.task) & (df["shard"] == 0)
        sel &= df["context_len_bucket"] == row.context_len_bucket
        sel &= df["cap"].isna() if pd.isna(row.cap) else df["cap"] == row.cap
        cache = df[sel & (df["method"] == row.cache_method)]
        out = {"pair": row.pair, "task": row.task, "context_len_bucket": row.context_len_bucket, "cap": row.cap,
               "method": row.cache_method,
               "tokens_kept": float((cache["tokens_sent"] / cache["context_tokens"]).mean()),
               "cache_e2e_ms": row.cache_e2e_ms, "text_e2e_ms": row.text_e2e_ms, "text_method": row.text_method}
        for name in parts:
            column = f"bytes_{name}"
            out[column] = float(cache[column].fillna(0).mean()) if column in cache else 0.0
        out.update(layer_dominance(cache.get("layer_bytes", pd.Series(dtype=str))))
        rows.append(out)
    return pd.DataFrame(rows)


def layer_dominance(layer_bytes: pd.Series) -> dict:
    """Which layers the bytes go to, from rows' `layer_bytes` (per-layer payload + scale bytes, space-separated):
    the fewest layers holding half of the mean bytes, as a fraction of the layers (about 0.5 when every layer
    weighs the same, as with kv:/rd: methods), and the three heaviest layers ('uniform' when every layer weighs
    the same); NaN / '' when nothing was sent."""
    sent = [np.array(text.split(), dtype=float) for text in layer_bytes.dropna() if str(text).strip()]
    if not sent:
        return {"layers_for_half": float("nan"), "top_layers": ""}
    mean = np.mean(sent, axis=0)  # (L,)
    order = np.argsort(-mean, kind="stable")
    needed = int(np.searchsorted(np.cumsum(mean[order]), mean.sum() / 2) + 1)
    top = "uniform" if mean.max() == mean.min() else ",".join(map(str, order[:3]))
    return {"layers_for_half": needed / len(mean), "top_layers": top}


def macros(table: pd.DataFrame, flip_table: pd.DataFrame, params: Params) -> dict:
    """Per (pair, task, bucket): the cap from which the cache wins beyond noise and where the winner flips
    ('none' if never), and the counts of cells each side wins."""
    target = params.target or "fig8"
    values = {}
    for row in flip_table.itertuples():
        base = (target, row.pair, row.task, f"ctx{row.context_len_bucket}")
        values[macro_name(*base, "cache wins from")] = _cap_text(row.cache_wins_from)
        values[macro_name(*base, "flip cap")] = _cap_text(row.flip_cap)
        values[macro_name(*base, "cache wins")] = int(row.cache_wins)
        values[macro_name(*base, "text wins")] = int(row.text_wins)
    return values


def _cap_text(cap) -> str:
    """A cap for a macro: its bytes, or 'none'."""
    return "none" if cap is None or pd.isna(cap) else str(int(cap))
