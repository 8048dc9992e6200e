"""A grid's missing cells fanned out over a Ray cluster, one task each (one GPU each when the run is on CUDA).

With `EMBER_RAY` set (`make fig8 RAY=auto`: `auto` joins a running cluster, `local` or `local:N` starts one on
this machine with N workers, anything else is a cluster address), `CellStore.run` sends every cell it lacks to
a task, waits for them all, then loads the stored cells as a serial run would: the same results.csv and
manifest, each row a worker computed recording it in `worker` (host and device). A task re-runs the experiment
in the worker with `EMBER_ONLY_CELL` naming its cell: there the store loads the cells before it that exist,
computes and stores that one cell and stops the run (`CellDone`). Cells are written atomically to the shared
output folder, so a task whose worker dies is retried by Ray and its cell computed once, never half-written.
Without `EMBER_RAY` nothing changes and Ray is not imported. Ray is an optional extra: `pip install -e '.[ray]'`.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import socket

from tqdm.auto import tqdm

from ember.errors import ReportError

RAY_ENV = "EMBER_RAY"
ONLY_ENV = "EMBER_ONLY_CELL"
FAULT_ENV = "EMBER_FAULT_ONCE"  # fault injection for tests: a folder; the first task to run exits hard
RETRIES = 3  # task retries after a worker dies


class CellDone(Exception):
    """Raised in a worker once its one cell is stored: the rest of the run is not this task's."""


def ray_address() -> str | None:
    """The cluster to fan out to (EMBER_RAY), or None for a serial run."""
    return os.environ.get(RAY_ENV) or None


def only_cell() -> str | None:
    """In a worker: the one cell this run computes (EMBER_ONLY_CELL)."""
    return os.environ.get(ONLY_ENV) or None


def worker_name() -> str:
    """Host and device of this worker, as rows computed here record it."""
    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return f"{socket.gethostname()}:{device}"


def _connect(address: str):
    try:
        import ray
    except ImportError:
        raise ReportError(f"{RAY_ENV}={address}: Ray is not installed; expected `pip install -e '.[ray]'`") from None
    if not ray.is_initialized():
        if address == "local" or address.startswith("local:"):
            workers = int(address.partition(":")[2] or os.cpu_count() or 1)
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
    return ray


def _task(module: str, fields: dict, cell: str, env: dict) -> str:
    """In a worker: run the experiment of `module` with `fields` until `cell` is stored; returns the worker."""
    os.environ.update(env)
    os.environ[ONLY_ENV] = cell
    fault = env.get(FAULT_ENV)
    if fault:
        try:
            os.makedirs(fault)  # exists after the first attempt of any task: fail once only
            os._exit(1)
        except FileExistsError:
            pass
    experiment = importlib.import_module(module)
    try:
        experiment.run(experiment.Params(**fields), progress=False)
    except CellDone:
        pass
    return worker_name()


def fan_out(params, cells: list[str], gpu: bool, progress: bool | None = None) -> list[str]:
    """Compute `cells` of the run with `params` as Ray tasks (one GPU each if `gpu`); returns the workers."""
    ray = _connect(ray_address())
    remote = ray.remote(num_gpus=1 if gpu else 0, num_cpus=0 if gpu else 1, max_retries=RETRIES)(_task)
    fields = {f.name: getattr(params, f.name) for f in dataclasses.fields(params)}
    env = {k: v for k, v in os.environ.items() if k.startswith("EMBER_") and k not in (RAY_ENV, ONLY_ENV)}
    pending = [remote.remote(type(params).__module__, fields, cell, env) for cell in cells]
    workers = []
    with tqdm(total=len(pending), desc=f"{params.target}: cells on Ray",
              disable=None if progress is None else not progress) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            workers.extend(ray.get(ready))
            bar.update(len(ready))
    return workers
