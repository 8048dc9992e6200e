"""Resumable grids: each finished cell of a run is stored under reports/<target>/cells/, keyed by a hash of the
run's params (all but the time budget) and the cell, so a long run can be finished in pieces (each under a time budget) and cells of
other params never mix in."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time

import pandas as pd

from ember.errors import ReportError
from ember.report import atomic_write, report_dir


class CellStore:
    """Finished cells of one run. `time_budget_s` > 0: `check_budget` stops the run (a ReportError saying how far
    it got) once that many seconds have passed since the store was made; finished cells stay stored."""

    def __init__(self, params, time_budget_s: float = 0.0):
        fields = {k: v for k, v in dataclasses.asdict(params).items() if k != "time_budget_s"}  # not a result
        values = json.dumps(fields, sort_keys=True, default=str)
        self.run_key = hashlib.sha256(values.encode()).hexdigest()[:12]
        self.folder = report_dir(params.target) / "cells"
        self.target, self.budget, self.began = params.target, time_budget_s, time.perf_counter()

    def _path(self, cell: str):
        return self.folder / f"{self.run_key}-{hashlib.sha256(cell.encode()).hexdigest()[:12]}.csv"

    def load(self, cell: str) -> pd.DataFrame | None:
        """The rows of a finished cell, or None."""
        path = self._path(cell)
        return pd.read_csv(path) if path.exists() else None

    def save(self, cell: str, df: pd.DataFrame) -> None:
        atomic_write(self._path(cell), df.to_csv(index=False))

    def check_budget(self, finished: int, total: int) -> None:
        """Raise once the time budget is spent and cells remain."""
        if self.budget > 0 and finished < total and time.perf_counter() - self.began > self.budget:
            raise ReportError(f"{self.target}: {finished} of {total} cells finished within time_budget_s="
                              f"{self.budget:g}; they are stored in {self.folder}: run again to continue")
