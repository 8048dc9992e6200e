"""What fig3 and tab1 share: the params of an in-process RL run and one cell = one full multi-round run
(a trainer under a cache policy, from the base model), resumable mid-way from its per-round checkpoints,
followed by the held-out accuracy of its final adapter."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import pandas as pd
import torch

from ember.engine import Engine, SamplingParams
from ember.errors import ParamsError, ReportError
from ember.experiments.cells import CellStore
from ember.experiments.workloads import RL_TASKS, check_lora_targets, resolve_device, rl_prompt_set
from ember.models.lora import PROJECTIONS
from ember.params import RunParams, param
from ember.policies import PolicyRunner, make_policy
from ember.tasks.extraction import REWARDS
from ember.tasks.metrics import accuracy
from ember.train import TRAINERS, TrainConfig, make_trainer
from ember.train.loop import LoopConfig, run_loop

POLICIES = ("naive", "prefix_only", "keep_stale", "update_locality", "periodic_refresh", "updatable_kv")
RL_RUNS = "rl_runs"  # the folder under reports/ of the RL runs every experiment shares


@dataclass(frozen=True)
class RLParams(RunParams):
    """The task, rounds, rollouts, trainer knobs and the policies' own parameters of an RL run."""

    task: str = param("extraction", choices=RL_TASKS)
    reward: str = param("weighted", choices=REWARDS)  # extraction's reward variant
    shots: int = param(2, low=0)  # worked examples in the shared prefix (extraction)
    prompts: int = param(2, low=1)
    candidates: int = param(2, low=2)
    rounds: int = param(2, low=1)
    max_tokens: int = param(8, low=1)
    temperature: float = param(0.7, low=0.0)
    held_out: int = param(2, low=1)  # items never trained on, answered greedily after the last round
    eval_max_tokens: int = param(16, low=1)
    rank: int = param(4, low=1)
    alpha: float = param(8.0, low=0.0)
    lr: float = param(1e-3, low=0.0)
    micro_batch: int = param(8, low=1)
    steps_per_round: int = param(1, low=1)
    clip_eps: float = param(0.2, low=0.0, high=1.0)
    kl_beta: float = param(0.0, low=0.0)
    dpo_beta: float = param(0.1, low=0.0)
    targets: tuple[str, ...] = tuple(PROJECTIONS)
    frozen_fraction: float = param(0.5, low=0.0, high=1.0)  # UpdateLocality(N): N = this share of the layers
    refresh_period: int = param(2, low=1)  # k of PeriodicRefresh(k) and UpdatableKV(k)
    rollout_batch: int = param(64, low=1)  # rows (prompts x candidates) decoded together
    block_size: int = param(16, low=1)
    cache_bytes: int = param(1 << 30, low=0)  # the prefix cache's budget
    probe_prompts: int = param(1, low=0)  # prompts whose cached K/V error is probed after every update
    time_budget_s: float = param(0.0, low=0.0)  # > 0: stop after this many seconds; a run resumes where it stopped

    def validate(self) -> None:
        super().validate()
        check_lora_targets(self)
        if self.probe_prompts > self.prompts:
            raise ParamsError(f"{type(self).__name__}.probe_prompts: expected at most prompts={self.prompts}, "
                              f"found {self.probe_prompts}")


def check_names(params, field: str, allowed) -> None:
    """Raise ParamsError unless `params.<field>` is a non-empty tuple of distinct names among `allowed`."""
    names = getattr(params, field)
    if not names or len(set(names)) != len(names) or set(names) - set(allowed):
        raise ParamsError(f"{type(params).__name__}.{field}: expected distinct names among {list(allowed)}, found "
                          f"{list(names)}")


def policy_spec(name: str, params: RLParams, num_layers: int) -> str:
    """The `make_policy` spec of a policy name with the run's N and k."""
    if name == "update_locality":
        return f"update_locality:{int(round(params.frozen_fraction * num_layers))}"
    if name in ("periodic_refresh", "updatable_kv"):
        return f"{name}:{params.refresh_period}"
    return name


def train_config(params: RLParams, layers: tuple[int, ...] | None = None) -> TrainConfig:
    """The trainers' settings from the run's params (`layers` restricts the adapter, for UpdateLocality)."""
    return TrainConfig(rank=params.rank, alpha=params.alpha, targets=params.targets, layers=layers, lr=params.lr,
                       seed=params.seed, micro_batch=params.micro_batch, steps_per_round=params.steps_per_round,
                       dpo_beta=params.dpo_beta, clip_eps=params.clip_eps, kl_beta=params.kl_beta)


def loop_config(params: RLParams) -> LoopConfig:
    """The loop's settings from the run's params."""
    return LoopConfig(rounds=params.rounds, candidates=params.candidates, temperature=params.temperature,
                      max_tokens=params.max_tokens, seed=params.seed, probe_prompts=params.probe_prompts)


def load_engine(params: RLParams) -> Engine:
    """The run's model in an engine on its device. On a GPU, float32 matrix products use TF32 (as training
    stacks do); the manifest's params say which dtype ran."""
    device = resolve_device(params.device)
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
    return Engine.load(params.model, dtype=params.dtype, device=device, seed=params.seed, progress=False)


def prompt_sets(engine, params: RLParams):
    """(the training prompt set revisited every round, the held-out set)."""
    train = rl_prompt_set(engine.tokenizer, params.task, params.prompts, params.seed, params.reward, params.shots)
    held_out = rl_prompt_set(engine.tokenizer, params.task, params.held_out, params.seed + 100_000, params.reward,
                             params.shots)
    return train, held_out


def rl_store(params: RLParams) -> CellStore:
    """The finished RL runs, shared by the experiments made of them (fig3 and tab1) under reports/rl_runs/: keyed by
    the fields of RLParams alone (not by the experiment's name, profile or grid) on the resolved device, so a
    trainer's run under a policy that one experiment made is reused by the other instead of run again."""
    own = {field.name: getattr(params, field.name) for field in dataclasses.fields(RLParams)}
    keyed = RLParams(**{**own, "target": RL_RUNS, "profile": "", "device": resolve_device(params.device)})
    return CellStore(keyed, params.time_budget_s, run_params=params)


def rl_cells(engine, params: RLParams, store: CellStore, runs, task, held_out, progress=None) -> dict:
    """The cells of `store.run` for the (policy, trainer) `runs` (each once, in order), named as `rl_store`
    shares them between experiments."""
    cells = {}
    for policy, trainer in dict.fromkeys(runs):
        name = f"policy={policy} trainer={trainer}"
        cells[name] = (lambda policy=policy, trainer=trainer, name=name:
                       rl_cell(engine, params, store, name, policy, trainer, task, held_out, progress))
    return cells


def rl_cell(engine, params: RLParams, store, cell: str, policy: str, trainer_name: str, task, held_out,
            progress=None) -> pd.DataFrame:
    """One RL run (rows per round) of `trainer_name` under `policy` on `engine`'s model, from the base model;
    checkpointed each round under the store, so a run stopped by the time budget resumes at its next round."""
    if trainer_name not in TRAINERS:
        raise ParamsError(f"trainer: expected one of {sorted(TRAINERS)}, found {trainer_name!r}")
    model, tokenizer = engine.model, engine.tokenizer
    layers = model.config.num_layers
    spec = policy_spec(policy, params, layers)
    frozen = int(spec.partition(":")[2]) if policy == "update_locality" else 0
    trained = tuple(range(frozen, layers)) if frozen else None
    if frozen >= layers:
        raise ParamsError(f"{type(params).__name__}.frozen_fraction: expected fewer than all {layers} layers frozen "
                          f"(something must train), found N={frozen}")
    rollout = Engine(model, tokenizer, max_batch_size=params.rollout_batch, progress=False, cuda_graphs=False)
    runner = PolicyRunner(rollout, make_policy(spec), params.block_size, params.cache_bytes)
    trainer = make_trainer(trainer_name, model, train_config(params, trained), rollout._pad_id)
    rows, finished = run_loop(runner, trainer, task, loop_config(params), store.checkpoint_dir(cell),
                              store.out_of_time, progress, meta={"model": params.model, "task": params.task,
                                                                 "prompts": list(task.prompts)})
    if not finished:
        raise ReportError(f"{params.target}: {cell} stopped after round {len(rows) - 1} of {params.rounds} within "
                          f"time_budget_s={params.time_budget_s:g}; its checkpoint is in {store.checkpoint_dir(cell)}: "
                          f"run again to continue")
    final = Engine(model, tokenizer, progress=False, prefix_cache=False, cuda_graphs=False)
    final.set_adapter(final.load_adapter(trainer.adapter))
    answers = final.generate(list(held_out.prompts), sampling=SamplingParams(temperature=0,
                                                                             max_tokens=params.eval_max_tokens))
    quality = accuracy([held_out.solved(i, out.completions[0].text) for i, out in enumerate(answers.outputs)])
    df = pd.DataFrame(rows)
    df.insert(0, "trainer", trainer_name)
    df.insert(0, "policy", runner.policy.name)
    df.insert(0, "policy_key", policy)
    df["num_layers"] = layers
    df["held_out_accuracy"] = quality["accuracy"]
    df["held_out_ci_low"], df["held_out_ci_high"] = quality["ci_low"], quality["ci_high"]
    return df
