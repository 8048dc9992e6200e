"""Rollouts under a cache policy: one engine whose prefix cache the policy manages across adapter updates.

`PolicyRunner.generate` runs rollouts through the engine (with the prefix cache, unless the policy caches
nothing) and `update` hot-swaps a new adapter in place, asks the policy what the cached prefixes are worth now
and applies its decision: drop, reuse (valid or knowingly stale), recompute layers >= N from stored boundary
states, or correct adapted layers with the low-rank delta. Stats count what each policy paid.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from ember.engine.prefix_cache import PrefixCache
from ember.engine.refresh import correct_with_delta, recompute_from_boundary
from ember.engine.timers import StageTimer
from ember.policies.base import CORRECT, RECOMPUTE, REUSE, CachePolicy, Decision, PolicyError, Update

ADAPTER_NAME = "policy"  # the one resident adapter a runner keeps (the current policy)


@dataclass
class PolicyStats:
    """What a policy paid and kept since the runner started. tokens x layers count the K/V work per layer."""

    hits: int = 0  # prefix-cache lookups (prompts, and shared prefixes warmed once) that reused cached blocks
    misses: int = 0  # lookups that reused nothing (without a prefix cache: every prompt)
    prompt_tokens: int = 0
    tokens_layers_recomputed: int = 0  # prefill of tokens not reused (x all layers) + recomputes after updates
    tokens_layers_corrected: int = 0  # low-rank corrections after updates
    tokens_layers_stale: int = 0  # cached K/V kept inexact at an update (reused stale, or corrected from stale
    # inputs), summed over updates
    prefill_s: float = 0.0  # generation prefill plus the refresh work done at updates
    refresh_s: float = 0.0  # the part of prefill_s spent at updates
    updates: int = 0
    flushes: int = 0
    bytes_held: int = 0  # prefix cache K/V and boundary states held now

    def as_dict(self) -> dict:
        """The counters as a plain dict."""
        return asdict(self)


class PolicyRunner:
    """Generation and adapter updates under `policy` on `engine`. The engine's prefix cache is replaced by one
    shaped for the policy (boundary states where it needs them); the engine's own adapter slots are used."""

    def __init__(self, engine, policy: CachePolicy, block_size: int = 16, max_bytes: int = 1 << 30):
        if not isinstance(policy, CachePolicy):
            raise PolicyError(f"PolicyRunner: expected a CachePolicy, found {type(policy).__name__}")
        self.engine, self.policy = engine, policy
        self.num_layers = engine.model.config.num_layers
        engine.prefix_cache = (PrefixCache(block_size, max_bytes, policy.boundary_layers(self.num_layers))
                               if policy.caches else None)
        self.stats = PolicyStats()
        self.exact_depth = self.num_layers  # cached K/V (and boundary states) of layers below this are exact
        self.last_update: dict = {}

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.engine.prefix_cache

    def generate(self, prompts, n: int = 1, sampling=None, progress: bool | None = None):
        """`engine.generate` under the policy; its GenerationResult, with the stats updated."""
        result = self.engine.generate(prompts, n, sampling, progress=progress, use_prefix_cache=self.policy.caches)
        stats = self.stats
        stats.prompt_tokens += result.prompt_tokens
        if self.policy.caches:
            cache = result.extra["prefix_cache"]
            stats.hits += cache["hits"]
            stats.misses += cache["misses"]
            stats.tokens_layers_recomputed += cache["tokens_recomputed"] * self.num_layers
        else:
            stats.misses += len(result.outputs)
            stats.tokens_layers_recomputed += result.prompt_tokens * self.num_layers
        stats.prefill_s += result.timings["prefill"]
        stats.bytes_held = self.prefix_cache.bytes_held if self.prefix_cache is not None else 0
        return result

    def update(self, adapter) -> dict:
        """Hot-swap `adapter` (a LoraAdapter or PEFT directory) into the engine and apply the policy's decision
        to the cached prefixes. Returns what was done at this update (also kept in `last_update`)."""
        engine = self.engine
        before = engine.versions
        old = engine.adapter(engine.active_adapter) if engine.active_adapter is not None else None
        engine.set_adapter(engine.load_adapter(adapter, ADAPTER_NAME))
        for name in engine.adapters:
            if name != ADAPTER_NAME:
                engine.remove_adapter(name)
        self.stats.updates += 1
        update = Update(self.stats.updates, before, engine.versions, old, engine.adapter(ADAPTER_NAME))
        timer = StageTimer(engine.device)
        with timer.stage("refresh"):
            done = self._apply(update) if self.policy.caches else {"decision": "none"}
        seconds = timer.totals()["refresh"]
        self.stats.refresh_s += seconds
        self.stats.prefill_s += seconds
        self.stats.bytes_held = self.prefix_cache.bytes_held if self.prefix_cache is not None else 0
        self.last_update = {"update": update.index, "valid_depth": update.valid_depth, "refresh_s": seconds, **done}
        return self.last_update

    def state(self) -> dict:
        """What a checkpoint needs to resume this runner: its counters, exact depth, last update and the prefix
        cache's blocks (the adapter in use is saved by the trainer)."""
        return {"policy": self.policy.name, "stats": self.stats.as_dict(), "exact_depth": self.exact_depth,
                "last_update": self.last_update,
                "cache": self.prefix_cache.state() if self.prefix_cache is not None else None}

    def restore(self, state: dict, adapter) -> None:
        """Resume from `state()` with `adapter` (the one in use when it was taken) active, without applying the
        policy again."""
        if state["policy"] != self.policy.name:
            raise PolicyError(f"PolicyRunner.restore: expected a state of {self.policy.name}, found one of "
                              f"{state['policy']}")
        engine = self.engine
        engine.set_adapter(engine.load_adapter(adapter, ADAPTER_NAME))
        self.stats = PolicyStats(**state["stats"])
        self.exact_depth, self.last_update = state["exact_depth"], state["last_update"]
        if state["cache"] is not None:
            engine.prefix_cache = PrefixCache.from_state(state["cache"], engine.device)

    def _apply(self, update: Update) -> dict:
        cache, decision = self.prefix_cache, self.policy.decide(update)
        if not isinstance(decision, Decision):
            raise PolicyError(f"{self.policy.name}.decide: expected a Decision, found {type(decision).__name__}")
        if update.before.model != update.after.model or decision.drop:
            dropped = cache.invalidate()
            self.stats.flushes += 1
            self.exact_depth = self.num_layers
            return {"decision": "drop", "blocks_dropped": dropped, "exact_depth": self.exact_depth}
        recompute, correct, inexact = self._layers(decision, update)
        dropped = cache.invalidate(update.before)  # blocks made under other weights: no decision covers them
        fingerprint = update.after.model
        cached_tokens = len(cache.blocks(fingerprint)) * cache.block_size
        with self.engine._own_slots():  # the new adapter bound, as in generation
            if recompute:
                tokens = recompute_from_boundary(self.engine.model, cache, fingerprint, recompute[0],
                                                 self.engine.max_batch_size)
                self.stats.tokens_layers_recomputed += tokens * len(recompute)
            if correct:
                self.stats.tokens_layers_corrected += correct_with_delta(
                    self.engine.model, cache, fingerprint, update.old_adapter, update.new_adapter, correct)
        self.stats.tokens_layers_stale += cached_tokens * len(inexact)
        self.exact_depth = min(inexact, default=self.num_layers)
        cache.accept(update.after)
        symbols = {REUSE: ".", RECOMPUTE: "R", CORRECT: "C"}
        return {"decision": "".join(symbols[a] for a in decision.layers), "blocks_dropped": dropped,
                "cached_tokens": cached_tokens, "layers_recomputed": len(recompute), "layers_corrected": len(correct),
                "layers_inexact": len(inexact), "exact_depth": self.exact_depth}

    def _layers(self, decision: Decision, update: Update) -> tuple[list[int], list[int], list[int]]:
        """Recomputed, corrected and inexact layers of a decision, checked for what can be applied.

        Layers below `base` (valid under the update, and exact before it) are exact. A recompute from layer M needs
        exact inputs at M (M <= base); a correction of layer c is exact only if c <= base (its inputs are exact);
        a reused layer at or above base is stale."""
        actions = decision.layers
        if len(actions) != self.num_layers or set(actions) - {REUSE, RECOMPUTE, CORRECT}:
            raise PolicyError(f"{self.policy.name}.decide: expected {self.num_layers} actions among reuse / "
                              f"recompute / correct, found {actions}")
        base = min(self.exact_depth, update.valid_depth)
        recompute = [i for i, a in enumerate(actions) if a == RECOMPUTE]
        if recompute and recompute != list(range(recompute[0], self.num_layers)):
            raise PolicyError(f"{self.policy.name}.decide: recomputed layers must be a suffix [N, L) of the layers, "
                              f"found {recompute}")
        if recompute and recompute[0] > base:
            raise PolicyError(f"{self.policy.name}.decide: recompute from layer {recompute[0]} needs exact inputs "
                              f"there, but the cached K/V is exact only below layer {base}")
        correct = [i for i, a in enumerate(actions) if a == CORRECT]
        inexact = [i for i, a in enumerate(actions) if (a == REUSE and i >= base) or (a == CORRECT and i > base)]
        return recompute, correct, inexact
