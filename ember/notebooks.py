"""Headless notebook runs: papermill executes notebooks/<target>_*.ipynb into reports/<target>/ atomically."""

from __future__ import annotations

import os
from pathlib import Path

from ember.errors import ReportError
from ember.params import resolve
from ember.report import REPO_ROOT, report_dir

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebook_for(target: str) -> Path:
    """The notebook of a target: the one file named notebooks/<target>_*.ipynb."""
    found = sorted(NOTEBOOK_DIR.glob(f"{target}_*.ipynb"))
    if len(found) != 1:
        raise ReportError(f"notebook for {target!r}: expected one notebooks/{target}_*.ipynb, found {len(found)}")
    return found[0]


def run_notebook(target: str, profile: str = "default", overrides: str = "", progress: bool = True) -> Path:
    """Execute a target's notebook with papermill; the executed copy lands in reports/<target>/ when done.

    Parameters are validated before any kernel starts, so a typo fails in a second, not after a long run.
    """
    import papermill

    resolve(target, profile, overrides)  # fail fast on bad profile / overrides
    source = notebook_for(target)
    folder = report_dir(target)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / source.name
    partial = folder / f".{source.stem}.running.ipynb"
    papermill.execute_notebook(str(source), str(partial), parameters={"profile": profile, "overrides": overrides},
                               cwd=str(REPO_ROOT), progress_bar=progress, kernel_name="python3")
    os.replace(partial, final)
    return final
