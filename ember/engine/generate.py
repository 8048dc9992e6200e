"""`Engine.generate`: batched prompts x n candidates, each prompt prefilled once and shared by its candidates."""

from __future__ import annotations

import random
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from tqdm import tqdm

from ember.engine.cache import KVCache
from ember.engine.cuda_graph import DecodeGraph
from ember.engine.past import PastKV
from ember.engine.pipeline import PipelineModel
from ember.engine.prefill import prefill
from ember.engine.prefix_cache import PrefixCache
from ember.engine.regroup import regroup
from ember.engine.sampling import RowKnobs, SamplingParams, candidate_seed, is_integer, sample
from ember.engine.shared_cache import cache_maker
from ember.engine.steps import append_step
from ember.engine.stop_strings import StopText, special_stop_ids
from ember.engine.stream import StreamEvent
from ember.engine.timers import StageTimer
from ember.errors import AdapterError, GenerationError
from ember.models.lora import (
    LoraAdapter,
    LoraSlots,
    check_fits,
    clear_bindings,
    kept_bindings,
    lora_modules,
)
from ember.models.versions import LayerVersions, layer_versions, model_fingerprint

if TYPE_CHECKING:
    from ember.models.decoder import DecoderLM


@dataclass
class Completion:
    """One candidate: tokens (a stop token is kept), text (cut before any stop string), per-token logprobs."""

    index: int
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str  # "stop" (stop token or string) or "length" (max_tokens)
    top_logprobs: list[dict[int, float]] | None = None


@dataclass
class RequestOutput:
    """The n candidates of one prompt, with the seed that produced them."""

    prompt_token_ids: list[int]
    seed: int
    completions: list[Completion]


@dataclass
class GenerationResult:
    """All requests' outputs and the stage timing breakdown in seconds (prefill / decode / sampling / total)."""

    outputs: list[RequestOutput]
    timings: dict[str, float]
    prompt_tokens: int  # real prompt tokens prefilled (once per prompt, not per candidate)
    generated_tokens: int
    batches: int = 1  # batches decoded (with continuous batching: the prefills that admitted requests)
    extra: dict = field(default_factory=dict)

    @property
    def decode_tokens_per_s(self) -> float:
        """Generated tokens per second of decode+sampling time."""
        busy = self.timings["decode"] + self.timings["sampling"]
        return self.generated_tokens / busy if busy > 0 else float("nan")


@dataclass
class _Request:
    index: int
    prompt: list[int]
    params: SamplingParams
    seed: int
    stop_ids: frozenset[int]  # stop_token_ids, the tokenizer's eos unless ignore_eos, special tokens in `stop`


class _Candidate:
    """Host-side state of one row while decoding. Its text is followed token by token (`StopText`) when stop
    strings need searching or the text is streamed; otherwise it is decoded once at the end."""

    def __init__(self, request: int, index: int, params: SamplingParams, stop_ids: frozenset[int], tokenizer,
                 follow_text: bool):
        self.request, self.index, self.params, self.stop_ids = request, index, params, stop_ids
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.logprobs: list[float] = []
        self.top: list[dict[int, float]] = []
        self.finish_reason: str | None = None
        self.text = StopText(tokenizer, params.stop) if tokenizer is not None and (follow_text or params.stop) else None

    def push(self, token: int, logprob: float, top: dict[int, float] | None) -> str:
        """Record a drawn token and decide whether the candidate finished; returns the text it released."""
        self.tokens.append(token)
        self.logprobs.append(logprob)
        if top is not None:  # the batch's widest request decides how many were drawn: keep this one's own
            self.top.append(dict(list(top.items())[:self.params.logprobs]))
        steps, params = len(self.tokens), self.params
        armed = steps > params.min_tokens
        if self.text is not None and self.text.push(token, search=armed):
            self.finish_reason = "stop"
        elif token in self.stop_ids and armed:
            self.finish_reason = "stop"
        elif steps >= params.max_tokens:
            self.finish_reason = "length"
        return self.text.release(final=self.finish_reason is not None) if self.text is not None else ""

    def result(self) -> Completion:
        if self.text is not None:
            text = self.text.text  # complete: the candidate's last push released everything
        else:
            text = self.tokenizer.decode(self.tokens) if self.tokenizer is not None else ""
        return Completion(self.index, self.tokens, text, self.logprobs, self.finish_reason or "length",
                          self.top if self.params.logprobs else None)


@dataclass
class _Resident:
    """An adapter held on the engine's device: its tensors, per-layer digests and slot-shaped copy."""

    adapter: LoraAdapter
    digests: dict[int, str]
    packed: list[torch.Tensor] | None = None


class Engine:
    """Generation over an ember decoder. The model keeps no state; each batch owns one `KVCache`.

    LoRA adapters are resident by name (`load_adapter`) and swapped in place into preallocated slots
    (`set_adapter`), without reloading the base or recapturing CUDA graphs. Cached K/V carries the per-layer
    versions of the weights in use (`versions`), derived from the base weights and the active adapter.
    """

    CAPACITY_BUCKET = 128  # graph workspaces round their capacity up to a multiple of this

    def __init__(self, model: DecoderLM, tokenizer=None, max_batch_size: int = 64, progress: bool | None = None,
                 cuda_graphs: bool = True, prefix_cache: PrefixCache | bool | None = True, max_workspaces: int = 4,
                 share_prompt_kv: bool = False, continuous_batching: bool = False):
        """`prefix_cache`: True for a default PrefixCache (16-token blocks, 1 GiB), a PrefixCache, or
        False/None to prefill every prompt in full. `max_workspaces`: caches (with their CUDA graphs) kept
        between calls, one per (batch, capacity) bucket. `share_prompt_kv`: with n > 1 candidates, store each
        prompt's K/V once for all of them (`SharedPromptCache`) instead of once per candidate.
        `continuous_batching`: when the requests need more than one batch, a prompt group whose candidates are
        all done leaves the batch and a waiting request takes its rows (`_run_continuous`), instead of every
        batch decoding to its longest row; such calls decode without CUDA graphs and without pasts, and a
        re-formed batch is a dense cache (a prompt's K/V stored once per candidate again)."""
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.progress = progress
        self.cuda_graphs = cuda_graphs  # replay decode steps as CUDA graphs when on a GPU
        self.share_prompt_kv = share_prompt_kv
        self.continuous_batching = continuous_batching
        if prefix_cache is True:
            prefix_cache = PrefixCache()
        self.prefix_cache = prefix_cache if isinstance(prefix_cache, PrefixCache) else None
        if max_workspaces < 1:
            raise GenerationError(f"max_workspaces: expected >= 1, found {max_workspaces}")
        self.max_workspaces = max_workspaces
        self._workspaces: OrderedDict[tuple[int, int], KVCache] = OrderedDict()
        self._graphs: dict[tuple, DecodeGraph] = {}
        self._adapters: dict[str, _Resident] = {}
        self._slots: LoraSlots | None = None
        self.active_adapter: str | None = None
        self._fingerprint: tuple | None = None  # (weights state, fingerprint)
        self._versions: tuple | None = None  # (fingerprint, active resident adapter, LayerVersions)
        self._lora_modules = list(lora_modules(self.model).values())

    # ---- versions -------------------------------------------------------------------------------------
    @property
    def versions(self) -> LayerVersions:
        """Per-layer versions of the weights in use: the base fingerprint (recomputed when a base weight
        changes in place, or after `weights_changed`) and the cumulative content of the active adapter's layers."""
        state = tuple((p.data_ptr(), p._version) for p in self.model.parameters())
        if self._fingerprint is None or self._fingerprint[0] != state:
            self._fingerprint = (state, model_fingerprint(self.model))
        resident = self._adapters[self.active_adapter] if self.active_adapter is not None else None
        if self._versions is None or self._versions[0] != self._fingerprint[1] or self._versions[1] is not resident:
            digests = resident.digests if resident is not None else None
            self._versions = (self._fingerprint[1], resident,
                              layer_versions(self._fingerprint[1], self.model.config.num_layers, digests))
        return self._versions[2]  # one object while nothing changes: cached blocks compare by identity first

    def weights_changed(self) -> None:
        """Recompute the base fingerprint at the next call. In-place updates of parameters are noticed on their
        own; call this after writing through `.data` (which torch does not count as a change)."""
        self._fingerprint = None

    # ---- adapters -------------------------------------------------------------------------------------
    @property
    def adapters(self) -> list[str]:
        """Names of the resident adapters."""
        return list(self._adapters)

    def adapter(self, name: str) -> LoraAdapter:
        """The resident adapter `name` as held on the engine's device (not a copy: do not modify it)."""
        if name not in self._adapters:
            raise AdapterError(f"adapter: expected one of the resident adapters {self.adapters}, found {name!r}")
        return self._adapters[name].adapter

    def load_adapter(self, source, name: str | None = None) -> str:
        """Make an adapter resident under `name` (default adapter-<k>): a PEFT directory or a LoraAdapter
        (copied: later changes to its tensors need another `load_adapter`). Reloading the active adapter's
        name swaps the new content in at once. Returns the name."""
        adapter = source if isinstance(source, LoraAdapter) else LoraAdapter.load(Path(source))
        check_fits(adapter, self.model)
        adapter = adapter.to(self.device, self.dtype)
        if name is None:
            name = next(f"adapter-{k}" for k in range(len(self._adapters) + 1) if f"adapter-{k}" not in self._adapters)
        self._adapters[name] = _Resident(adapter, adapter.layer_digests())
        if self._slots is None or not self._slots.fits(adapter):
            self._build_slots()
        else:
            self._adapters[name].packed = self._slots.pack(adapter)
        if self.active_adapter == name:
            self._slots.load(self._adapters[name].packed)
        return name

    def set_adapter(self, name: str | None) -> None:
        """Activate a resident adapter by copying it into the slots in place (no reload, no graph recapture);
        None returns exactly to the base model. Going back to an earlier adapter is the same call."""
        if name is not None and name not in self._adapters:
            raise AdapterError(f"set_adapter: expected one of the resident adapters {self.adapters} or None, "
                               f"found {name!r}")
        if self._slots is not None:
            self._slots.load(None if name is None else self._adapters[name].packed)
        self.active_adapter = name

    def remove_adapter(self, name: str) -> None:
        """Drop a resident adapter (the active one cannot be removed)."""
        if name == self.active_adapter:
            raise AdapterError(f"remove_adapter: {name!r} is active; set_adapter(None) or another first")
        if self._adapters.pop(name, None) is None:
            raise AdapterError(f"remove_adapter: expected one of {self.adapters}, found {name!r}")

    @contextmanager
    def _own_slots(self):
        """While the engine runs, bind its active adapter (or clear every slot); afterwards give back whatever
        was bound before (another engine's slots, a trainer's `attach`). The engine's `versions` therefore
        always describe the weights it runs, and it never disturbs anyone else's binding."""
        with kept_bindings(self._lora_modules):
            if self._slots is not None:
                self._slots.bind(self.active_adapter is not None)
            else:
                clear_bindings(self._lora_modules)
            yield

    def _build_slots(self) -> None:
        """(Re)allocate slots for every resident adapter; graphs captured over the old slots are dropped."""
        if self._slots is not None:
            self._slots.load(None)
        self._graphs = {key: graph for key, graph in self._graphs.items() if key[1] is None}
        self._slots = LoraSlots(self.model, LoraSlots.layout_for(r.adapter for r in self._adapters.values()))
        for resident in self._adapters.values():
            resident.packed = self._slots.pack(resident.adapter)
        if self.active_adapter is not None:
            self._slots.load(self._adapters[self.active_adapter].packed)

    # ---- prefix cache ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def pin_prefix(self, prompt, pinned: bool = True) -> int:
        """Prefill a prefix (text or token ids) into the prefix cache if needed and pin (or unpin) its blocks,
        so eviction never drops them. Returns the number of blocks pinned."""
        if self.prefix_cache is None:
            raise GenerationError("pin_prefix: this engine has no prefix cache (prefix_cache=False)")
        tokens = self._requests([prompt], 1, None)[0].prompt
        whole_blocks = len(tokens) - len(tokens) % self.prefix_cache.block_size
        versions = self.versions
        if pinned and self.prefix_cache.cached_tokens(tokens, versions) < whole_blocks:
            with self._own_slots():
                prefill(self.model, [tokens], 1, 0, self._pad_id, self._fresh_cache, versions, self.prefix_cache)
        return self.prefix_cache.pin(tokens, versions, pinned)

    @torch.inference_mode()
    def prefill_kv(self, prompt, use_prefix_cache: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """The K/V (L, 2, H, T, D) and next-token logits (V,) that generation would start from for one prompt
        (text or token ids): reused cached blocks plus the computed rest, or (use_prefix_cache False) a fresh
        prefill. Goes through the prefix cache as generation does (blocks it lacks are inserted)."""
        tokens = self._requests([prompt], 1, None)[0].prompt
        cache_in = self.prefix_cache if use_prefix_cache else None
        with self._own_slots():
            cache, logits = prefill(self.model, [tokens], 1, 0, self._pad_id, self._fresh_cache, self.versions,
                                    cache_in)
        return cache.read(0, torch.arange(len(tokens))), logits[0]

    @classmethod
    def load(cls, spec: str, dtype="float32", device="cpu", seed: int = 0, **kwargs) -> "Engine":
        """An engine over `ember.models.load(spec, ...)`; the weights' provenance is kept on `.provenance`."""
        from ember.models import load

        loaded = load(spec, dtype=dtype, device=device, seed=seed)
        engine = cls(loaded.model, loaded.tokenizer, **kwargs)
        engine.provenance = loaded.provenance
        return engine

    @property
    def device(self) -> torch.device:
        return self.model.output_weight.device

    @property
    def _pad_id(self) -> int:
        """Token id that fills left padding (its K/V is masked out, so any valid id works)."""
        if self.tokenizer is None or self.tokenizer.pad_token_id is None:
            return 0
        return self.tokenizer.pad_token_id

    @property
    def dtype(self) -> torch.dtype:
        return self.model.output_weight.dtype

    def _fresh_cache(self, batch: int, capacity: int, group: int = 1, prompt_slots: int = 0) -> KVCache:
        return cache_maker(self.model)(batch, capacity, group, prompt_slots)

    def _graphs_on(self) -> bool:
        return self.cuda_graphs and self.device.type == "cuda" and not isinstance(self.model, PipelineModel)

    def _graph_key(self, cache: KVCache) -> tuple:
        return cache.layout, id(self._slots) if self.active_adapter is not None else None

    def _workspace(self, batch: int, capacity: int, timer: StageTimer, group: int = 1,
                   prompt_slots: int = 0) -> KVCache:
        """An empty cache for a batch (with `prompt_slots`, a SharedPromptCache of that prompt region): on a GPU
        with graphs, the bucket's persistent cache with its decode graph captured (once per bucket and
        adapter-slot layout, before any prefill); else a fresh one. Buckets round the capacity (a shared
        cache's prompt region and generated region each) up to a multiple of CAPACITY_BUCKET."""
        if not self._graphs_on():
            return self._fresh_cache(batch, capacity, group, prompt_slots)
        bucket = lambda slots: -(-slots // self.CAPACITY_BUCKET) * self.CAPACITY_BUCKET  # noqa: E731
        if prompt_slots:
            capacity, prompt_slots = bucket(prompt_slots) + bucket(capacity - prompt_slots), bucket(prompt_slots)
        else:
            capacity = bucket(capacity)
        key = (batch, capacity, group, prompt_slots)
        cache = self._workspaces.pop(key, None) or self._fresh_cache(batch, capacity, group, prompt_slots)
        self._workspaces[key] = cache
        while len(self._workspaces) > self.max_workspaces:
            dropped, _ = self._workspaces.popitem(last=False)
            self._graphs = {k: g for k, g in self._graphs.items() if k[0] != dropped}
        graph_key = self._graph_key(cache)
        if graph_key not in self._graphs:
            with timer.stage("capture"):
                self._graphs[graph_key] = DecodeGraph(self.model, cache)
        cache.reset()
        return cache

    def generate(self, prompts, n: int = 1, sampling: SamplingParams | list[SamplingParams] | None = None,
                 progress: bool | None = None, use_prefix_cache: bool = True,
                 past: list[PastKV] | None = None) -> GenerationResult:
        """Generate `n` candidates for each prompt (text, or a list of token ids).

        `sampling` is one SamplingParams for all prompts or a list with one per prompt. Prompts are batched
        up to `max_batch_size` rows (prompts x n); each prompt is prefilled once per batch and its K/V shared
        by its candidates. Cached prefixes (across calls, and shared within the batch) are reused unless
        `use_prefix_cache` is False. `past` (one PastKV per prompt) puts given K/V before each prompt (a
        received cache), the prompt starting at its next position; the prefix cache is then not used. A past
        with `layer_valid` (some tokens hidden from some layers) decodes without CUDA graphs.
        Returns outputs in prompt order with a stage timing breakdown.
        """
        requests = self._requests(prompts, n, sampling)
        if past is not None:
            self._check_past(past, requests)
            use_prefix_cache = False
        run = self._run(requests, n, progress, use_prefix_cache, stream=False, past=past)
        while True:  # yields nothing when not streaming; the result is the generator's return value
            try:
                next(run)
            except StopIteration as done:
                return done.value

    def stream(self, prompts, n: int = 1, sampling: SamplingParams | list[SamplingParams] | None = None,
               use_prefix_cache: bool = True) -> Iterator[StreamEvent]:
        """`generate`, yielding a StreamEvent per candidate and step as tokens are drawn: the same tokens as
        `generate` for the same seeds, and per candidate, text deltas that join to its Completion.text. Bad
        arguments raise here, before the first event."""
        return self._run(self._requests(prompts, n, sampling), n, False, use_prefix_cache, stream=True)

    def _check_past(self, past, requests: list[_Request]) -> None:
        if not isinstance(past, (list, tuple)) or len(past) != len(requests):
            found = f"{len(past)}" if isinstance(past, (list, tuple)) else _kind(past)
            raise GenerationError(f"past: expected a list of one PastKV per prompt ({len(requests)}), found {found}")
        limit = self.model.config.max_position_embeddings
        for request, item in zip(requests, past):
            if not isinstance(item, PastKV):
                raise GenerationError(f"past {request.index}: expected a PastKV, found {_kind(item)}")
            item.check(self.model.config, request.index)
            end = item.next_position + len(request.prompt) + request.params.max_tokens
            if end > limit:
                raise GenerationError(f"past {request.index}: position {item.next_position} + prompt and max_tokens "
                                      f"reach {end}, beyond the model's context length {limit}")

    @torch.inference_mode()
    def _run(self, requests: list[_Request], n: int, progress, use_prefix_cache: bool, stream: bool,
             past: list[PastKV] | None = None):
        """The generation loop behind `generate` and `stream`: yields StreamEvents when `stream`, returns the
        GenerationResult."""
        timer = StageTimer(self.device)
        per_batch = max(1, self.max_batch_size // n)
        batches = [requests[i:i + per_batch] for i in range(0, len(requests), per_batch)]
        show = self.progress if progress is None else progress
        total_steps = sum(max(r.params.max_tokens for r in batch) for batch in batches)
        began = time.perf_counter()
        stats_before = self.prefix_cache.stats.as_dict() if self.prefix_cache is not None else {}
        outputs = []
        with tqdm(total=total_steps, desc="generate", unit="step", disable=None if show is None else not show,
                  leave=False) as bar, self._own_slots():
            if self.continuous_batching and past is None and len(batches) > 1:
                outputs, batch_count = yield from self._run_continuous(requests, n, timer, bar, use_prefix_cache,
                                                                       stream)
            else:
                batch_count = len(batches)
                for batch in batches:
                    pasts = None if past is None else [past[r.index] for r in batch]
                    outputs.extend((yield from self._run_batch(batch, n, timer, bar, use_prefix_cache, stream,
                                                               pasts)))
        timings = timer.totals()
        timings["total"] = time.perf_counter() - began
        generated = sum(len(c.token_ids) for out in outputs for c in out.completions)
        extra = {}
        if self.prefix_cache is not None and use_prefix_cache:
            extra["prefix_cache"] = {k: after - stats_before.get(k, 0)
                                     for k, after in self.prefix_cache.stats.as_dict().items()}
            extra["prefix_cache"].update(bytes_held=self.prefix_cache.bytes_held, blocks=len(self.prefix_cache))
        return GenerationResult(outputs, timings, sum(len(r.prompt) for r in requests), generated, batch_count,
                                extra)

    def _requests(self, prompts, n: int, sampling) -> list[_Request]:
        expected = "prompts: expected a list of prompts (strings or token-id lists)"
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts and is_integer(prompts[0])):
            raise GenerationError(f"{expected}, found one prompt; wrap it in a list")
        if not isinstance(prompts, (list, tuple)):
            raise GenerationError(f"{expected}, found {_kind(prompts)}")
        if not is_integer(n) or n < 1:
            raise GenerationError(f"n: expected an integer >= 1, found {n!r}")
        if not prompts:
            raise GenerationError("prompts: expected at least one prompt, found an empty list")
        if sampling is None or isinstance(sampling, SamplingParams):
            params = [sampling or SamplingParams()] * len(prompts)
        elif not isinstance(sampling, (list, tuple)):
            raise GenerationError(f"sampling: expected a SamplingParams or a list of them, found {_kind(sampling)}")
        elif len(sampling) == len(prompts):
            params = list(sampling)
        else:
            raise GenerationError(f"sampling: expected one SamplingParams or {len(prompts)}, found {len(sampling)}")
        vocab = self.model.config.vocab_size
        requests = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            if not isinstance(p, SamplingParams):
                raise GenerationError(f"sampling[{i}]: expected a SamplingParams, found {_kind(p)}")
            if isinstance(prompt, str):
                if self.tokenizer is None:
                    raise GenerationError("prompts: this model has no tokenizer; pass token-id lists, found text")
                prompt = self.tokenizer.encode(prompt)
            elif not isinstance(prompt, (list, tuple)):
                raise GenerationError(f"prompt {i}: expected a string or a list of token ids, found {_kind(prompt)}")
            if not prompt:
                raise GenerationError(f"prompt {i}: expected at least one token, found none")
            bad = [t for t in prompt if not is_integer(t)]
            if bad:
                raise GenerationError(f"prompt {i}: expected integer token ids, found {bad[:3]!r}")
            prompt = [int(t) for t in prompt]
            limit = self.model.config.max_position_embeddings
            if len(prompt) + p.max_tokens > limit:
                raise GenerationError(f"prompt {i}: {len(prompt)} prompt tokens + max_tokens {p.max_tokens} exceed the "
                                      f"model's context length {limit}")
            if min(prompt) < 0 or max(prompt) >= vocab:
                raise GenerationError(f"prompt {i}: token ids must be in [0, {vocab}), found {min(prompt)}..{max(prompt)}")
            if p.logprobs > vocab:
                raise GenerationError(f"SamplingParams.logprobs: expected at most the vocabulary size {vocab}, "
                                      f"found {p.logprobs}")
            if p.stop and self.tokenizer is None:
                raise GenerationError("SamplingParams.stop: stop strings need a tokenizer; this model has none")
            eos = () if p.ignore_eos or self.tokenizer is None else self.tokenizer.eos_token_ids
            stop_ids = frozenset(p.stop_token_ids) | frozenset(eos)
            if p.stop:
                stop_ids |= special_stop_ids(p.stop, self.tokenizer)
            seed = p.seed if p.seed is not None else random.SystemRandom().getrandbits(63)
            requests.append(_Request(i, prompt, p, seed, stop_ids))
        return requests

    def _run_batch(self, requests: list[_Request], n: int, timer: StageTimer, bar, use_cache: bool, stream: bool,
                   pasts: list[PastKV] | None = None):
        """Decode one batch to the end: yields each step's StreamEvents when `stream`, returns its outputs."""
        device, vocab = self.device, self.model.config.vocab_size
        max_new = max(r.params.max_tokens for r in requests)
        rows = [(r.params, candidate_seed(r.seed, j)) for r in requests for j in range(n)]
        candidates = [_Candidate(r.index, j, r.params, r.stop_ids, self.tokenizer, stream)
                      for r in requests for j in range(n)]
        knobs = RowKnobs.build(rows, device)
        banned = self._min_token_bans(candidates, vocab, device)
        ban_steps = max(c.params.min_tokens for c in candidates)  # steps during which some row bans stop tokens
        versions = self.versions
        with timer.stage("prefill"):
            cache, logits = prefill(self.model, [r.prompt for r in requests], n, max_new, self._pad_id,
                                    lambda batch, capacity, **shared: self._workspace(batch, capacity, timer, **shared),
                                    versions, self.prefix_cache if use_cache else None, pasts,
                                    share_prompt=self.share_prompt_kv)
            logits = logits.repeat_interleave(n, dim=0)  # (P*n, V)
            cache.start_decode()
        # the captured graph runs masks without per-layer validity: a past seen by some layers only decodes
        # eagerly; and a graph replays only over the workspace it was captured on
        eager = not self._graphs_on() or cache.layer_valid is not None
        graph = None if eager else self._graphs.get(self._graph_key(cache))
        if graph is not None and graph.cache is not cache:
            graph = None
        if graph is not None:
            cache.sync_slot()
        for step in range(max_new):
            drawn, events = self._draw(logits, knobs, candidates, step, banned if step < ban_steps else None,
                                       timer, stream)
            yield from events  # outside the stages: the consumer's time is not the engine's
            bar.update(1)
            if all(c.finish_reason is not None for c in candidates):
                bar.update(max_new - step - 1)
                break
            with timer.stage("decode"):
                if graph is not None:
                    logits = graph.step(drawn.tokens)  # (B, V)
                else:
                    step = append_step(cache, cache.batch, 1, logits="last")
                    logits = self.model.run(step, input_ids=drawn.tokens[:, None]).logits[:, -1]  # (B, V)
        return [RequestOutput(r.prompt, r.seed, [c.result() for c in candidates[i * n:(i + 1) * n]])
                for i, r in enumerate(requests)]

    def _draw(self, logits: torch.Tensor, knobs: RowKnobs, candidates: list[_Candidate], step, banned, timer,
              stream: bool):
        """Sample one token per row (`step`: the draw index, one int or (B,) per row) and push it to each
        unfinished candidate; returns the draw and the StreamEvents when `stream`."""
        with timer.stage("sampling"):
            if banned is not None:
                steps = [len(c.tokens) for c in candidates]
                banning = torch.tensor([s < c.params.min_tokens for s, c in zip(steps, candidates)],
                                       device=logits.device)  # (B,)
                banned = banned & banning[:, None]
            drawn = sample(logits, knobs, step, banned=banned)
            tokens, logprobs = drawn.tokens.tolist(), drawn.logprobs.tolist()
            tops = _top_dicts(drawn)
        events = []
        with timer.stage("detokenize"):  # host side: stop tokens and strings, incremental text
            for row, cand in enumerate(candidates):
                if cand.finish_reason is None:
                    text = cand.push(tokens[row], logprobs[row], tops[row] if tops else None)
                    if stream:
                        events.append(StreamEvent(cand.request, cand.index, tokens[row], text, logprobs[row],
                                                  cand.finish_reason))
        return drawn, events

    def _run_continuous(self, requests: list[_Request], n: int, timer: StageTimer, bar, use_cache: bool,
                        stream: bool):
        """Decode every request with continuous batching: up to max_batch_size // n prompt groups decode at
        once; when all candidates of a group are done its rows leave the batch and waiting requests are
        prefilled into their place (rows re-formed by `regroup`), so short groups do not wait for long ones.
        Each candidate draws with its own step count, so it gets the tokens of a static batch. Decodes
        eagerly (the batch shape changes). Yields StreamEvents when `stream`; returns outputs in request order
        and the number of prefills."""
        device, vocab, groups = self.device, self.model.config.vocab_size, max(1, self.max_batch_size // n)
        waiting, active, done, prefills = list(requests), [], {}, 0
        cache = logits = None
        versions = self.versions
        while waiting or active:
            kept = [i for i, (_, cands) in enumerate(active) if any(c.finish_reason is None for c in cands)]
            for i, (request, cands) in enumerate(active):
                if i not in kept:
                    done[request.index] = RequestOutput(request.prompt, request.seed, [c.result() for c in cands])
            admitted, waiting = waiting[:groups - len(kept)], waiting[groups - len(kept):]
            if len(kept) < len(active) or admitted:  # re-form the batch: kept rows, then the admitted groups
                sources = [(cache, i * n + j) for i in kept for j in range(n)]
                rows = [logits[i * n:(i + 1) * n] for i in kept]
                if admitted:
                    with timer.stage("prefill"):
                        fresh, first = prefill(self.model, [r.prompt for r in admitted], n,
                                               max(r.params.max_tokens for r in admitted), self._pad_id,
                                               self._fresh_cache, versions, self.prefix_cache if use_cache else None,
                                               share_prompt=self.share_prompt_kv)
                    prefills += 1
                    sources += [(fresh, row) for row in range(fresh.batch)]
                    rows.append(first.repeat_interleave(n, dim=0))  # (P*n, V)
                active = [active[i] for i in kept] + [
                    (r, [_Candidate(r.index, j, r.params, r.stop_ids, self.tokenizer, stream) for j in range(n)])
                    for r in admitted]
                if not active:
                    break
                if kept:  # rows of the old cache stay: copy them (and any admitted rows) into one new cache
                    with timer.stage("prefill"):
                        extra = max(c.params.max_tokens - len(c.tokens) for _, cands in active for c in cands)
                        cache = regroup(sources, extra, self._fresh_cache)
                else:  # only admitted groups: their prefill cache is the batch's
                    cache = fresh
                    cache.start_decode()
                logits = torch.cat(rows)  # (B, V)
                candidates = [c for _, cands in active for c in cands]
                knobs = RowKnobs.build([(c.params, candidate_seed(r.seed, c.index)) for r, cands in active
                                        for c in cands], device)
                banned = self._min_token_bans(candidates, vocab, device)
            steps = torch.tensor([len(c.tokens) for c in candidates], device=device)  # (B,) each row's draw index
            drawn, events = self._draw(logits, knobs, candidates, steps, banned, timer, stream)
            yield from events
            bar.update(1)
            if all(c.finish_reason is not None for c in candidates):
                continue  # the loop's top collects the finished groups
            with timer.stage("decode"):
                step = append_step(cache, cache.batch, 1, logits="last")
                logits = self.model.run(step, input_ids=drawn.tokens[:, None]).logits[:, -1]  # (B, V)
        return [done[r.index] for r in requests], prefills

    @staticmethod
    def _min_token_bans(candidates: list[_Candidate], vocab: int, device) -> torch.Tensor | None:
        """(B, V) mask of stop tokens that rows may not draw before their min_tokens, or None if unused."""
        if not any(c.params.min_tokens and c.stop_ids for c in candidates):
            return None
        banned = torch.zeros(len(candidates), vocab, dtype=torch.bool)
        for row, cand in enumerate(candidates):
            if cand.params.min_tokens:
                banned[row, [t for t in cand.stop_ids if t < vocab]] = True
        return banned.to(device)


def _kind(value) -> str:
    """How an argument of the wrong kind reads in an error message: None, a list, a torch.Tensor, ..."""
    if value is None:
        return "None"
    module = type(value).__module__
    return f"a {'' if module == 'builtins' else module + '.'}{type(value).__qualname__}"


def _top_dicts(drawn) -> list[dict[int, float]] | None:
    if drawn.top_ids is None:
        return None
    return [dict(zip(ids, lps)) for ids, lps in zip(drawn.top_ids.tolist(), drawn.top_logprobs.tolist())]
