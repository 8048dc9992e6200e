"""Resumable grids: each finished cell of a run is stored under reports/<target>/cells/, keyed by a hash of the
run's params (all but the time budget), of ember's source code and of the cell, so a long run can be finished
in pieces (each under a time budget), while cells of other params or made by other code never mix in."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from ember.errors import ReportError
from ember.experiments.fan_out import CellDone, fan_out, only_cell, ray_address, worker_name
from ember.experiments.workloads import resolve_device
from ember.report import atomic_write, report_dir

PACKAGE = Path(__file__).resolve().parent.parent


def code_hash() -> str:
    """sha256 over the paths and contents of ember's Python sources."""
    digest = hashlib.sha256()
    for path in sorted(PACKAGE.rglob("*.py")):
        digest.update(f"{path.relative_to(PACKAGE)}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


class CellStore:
    """Finished cells of one run. `time_budget_s` > 0 stops the run (a ReportError saying how far it got) once that
    many seconds have passed since the store was made and cells remain; finished cells stay stored.

    `per_cell` names params that each cell's name spells out itself (e.g. the caps of a sweep): they are left
    out of the run's key, so a sweep grown by one cap reuses the cells it already has. `force` recomputes
    (and overwrites) every cell. `run_params` (default `params`) is what a Ray worker re-runs, with its class's
    module's `run`; `distribute` False keeps a grid serial even with EMBER_RAY (cells timed against each other)."""

    def __init__(self, params, time_budget_s: float = 0.0, per_cell: tuple[str, ...] = (), force: bool = False,
                 run_params=None, distribute: bool = True):
        if force and time_budget_s > 0:
            raise ReportError(f"{params.target}: force with time_budget_s={time_budget_s:g} would recompute the first "
                              f"cells on every resumed run and never finish; expected one of them")
        skip = {"time_budget_s", "force", *per_cell}  # not results, or in the cell's own name
        fields = {k: v for k, v in dataclasses.asdict(params).items() if k not in skip}
        values = json.dumps({"params": fields, "code": code_hash()}, sort_keys=True, default=str)
        self.force, self.distribute = force, distribute
        self.run_params = params if run_params is None else run_params  # what a Ray worker re-runs (its module's)
        self.fanned: set[str] = set()  # cells Ray workers computed for this run (loaded even when forced)
        self.run_key = hashlib.sha256(values.encode()).hexdigest()[:12]
        self.folder = report_dir(params.target) / "cells"
        self.target, self.budget, self.began = params.target, time_budget_s, time.perf_counter()
        self.computed = 0  # cells computed (not loaded) by this run

    def out_of_time(self) -> bool:
        """Whether the time budget (if any) is spent."""
        return self.budget > 0 and time.perf_counter() - self.began > self.budget

    def should_stop(self) -> bool:
        """Whether to stop between cells: the budget is spent and this run computed a cell (so every run of a
        sweep makes progress however small its budget, and loading stored cells never counts as work)."""
        return self.computed > 0 and self.out_of_time()

    def checkpoint_dir(self, cell: str) -> Path:
        """Where a cell that runs in rounds keeps its checkpoint (so a cell itself can resume mid-way)."""
        return self.folder.parent / "checkpoints" / f"{self.run_key}-{hashlib.sha256(cell.encode()).hexdigest()[:12]}"

    def _path(self, cell: str) -> Path:
        return self.folder / f"{self.run_key}-{hashlib.sha256(cell.encode()).hexdigest()[:12]}.csv"

    def load(self, cell: str) -> pd.DataFrame | None:
        """The rows of a finished cell, or None (always None when forced)."""
        path = self._path(cell)
        return pd.read_csv(path) if path.exists() and (not self.force or cell in self.fanned) else None

    def missing(self, cells) -> list[str]:
        """The cells among `cells` that are not finished (all of them when forced)."""
        return [cell for cell in cells if (self.force and cell not in self.fanned) or not self._path(cell).exists()]

    def save(self, cell: str, df: pd.DataFrame) -> None:
        """Store a finished cell's rows (atomically)."""
        atomic_write(self._path(cell), df.to_csv(index=False))

    def run(self, cells: dict[str, Callable[[], pd.DataFrame]], progress: bool | None = None) -> pd.DataFrame:
        """Every cell's rows, in order, as stored (so a fresh and a resumed run give the same frame): loaded
        when stored, else computed and stored; after each cell the time budget is checked. With EMBER_RAY the
        missing cells are computed by Ray workers first (`ember.experiments.fan_out`); in such a worker only
        its one cell is computed, then the run stops (CellDone)."""
        only = only_cell()
        if only is None and self.distribute and ray_address():
            missing = self.missing(list(cells))
            if missing:
                device = resolve_device(getattr(self.run_params, "device", "cpu"))
                fan_out(self.run_params, missing, gpu=torch.device(device).type == "cuda", progress=progress)
                self.fanned.update(missing)
        frames = []
        for done, (cell, compute) in enumerate(tqdm(cells.items(), desc=self.target,
                                                     disable=None if progress is None else not progress)):
            if only is not None and cell != only:  # a worker keeps the stored cells before its own, no others
                frame = self.load(cell)
                if frame is not None:
                    frames.append(frame)
                continue
            frame = self.load(cell)
            if frame is None:
                rows = compute()
                if only is not None:
                    rows["worker"] = worker_name()
                self.save(cell, rows)
                self.computed += 1
                frame = pd.read_csv(self._path(cell))  # as stored: a resumed run reads the same frame
            if only is not None:
                raise CellDone(cell)
            frames.append(frame)
            if done + 1 < len(cells) and self.should_stop():
                raise ReportError(f"{self.target}: {done + 1} of {len(cells)} cells finished within time_budget_s="
                                  f"{self.budget:g}; they are stored in {self.folder}: run again to continue")
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()  # (empty: a worker's other cells)
