"""Headless notebook runs: papermill executes notebooks/<target>_*.ipynb into reports/<target>/ atomically."""

from __future__ import annotations

import os
from pathlib import Path

from ember.errors import ReportError
from ember.params import load_params
from ember.report import REPO_ROOT, report_dir

NOTEBOOK_DIR = REPO_ROOT / "notebooks"


def notebook_for(target: str) -> Path:
    """The notebook of a target: the one file named notebooks/<target>_*.ipynb."""
    found = sorted(NOTEBOOK_DIR.glob(f"{target}_*.ipynb"))
    if len(found) != 1:
        raise ReportError(f"notebook for {target!r}: expected one notebooks/{target}_*.ipynb, found {len(found)}")
    return found[0]


def run_notebook(target: str, profile: str = "default", overrides: str = "", progress: bool = True,
                 reuse: bool = False, allow_stale: bool = False) -> Path:
    """Execute a target's notebook with papermill; the executed copy lands in reports/<target>/ when done.

    Parameters (types, ranges, device) are validated before any kernel starts, so a typo fails in a second, not
    after a long run; a failed run leaves no partial notebook behind.
    `reuse` renders the figure from an existing run of the same params (see `run_headless`) instead of
    measuring again; `allow_stale` lets it render a run whose git SHA is unknown, marked stale.
    """
    validated_params(target, profile, overrides, measure=not reuse)
    import papermill

    source = notebook_for(target)
    folder = report_dir(target)
    folder.mkdir(parents=True, exist_ok=True)
    final = folder / source.name
    partial = folder / f".{source.stem}.running.ipynb"
    parameters = {"profile": profile, "overrides": overrides, "reuse": reuse, "allow_stale": allow_stale}
    try:
        papermill.execute_notebook(str(source), str(partial), parameters=parameters,
                                   cwd=str(REPO_ROOT), progress_bar=progress, kernel_name="python3")
        os.replace(partial, final)
    finally:
        partial.unlink(missing_ok=True)
    return final


def validated_params(target: str, profile: str, overrides: str = "", measure: bool = True):
    """A target's params, validated (types, ranges and, when the run measures here, the device) before any work."""
    from ember.experiments.workloads import resolve_device

    params = load_params(target, profile, overrides)
    if measure:
        resolve_device(params.device)
    return params


def run_headless(target: str, profile: str = "default", overrides: str = "",
                 progress: bool | None = None) -> dict[str, Path]:
    """Run a target's experiment without a notebook (e.g. on a GPU machine without Jupyter) and write
    results.csv + manifest.json; `make <target> REUSE=1` later renders the figure and macros from them.
    `progress`: None shows progress bars on a terminal only, True always."""
    import time

    from ember.experiments import experiment_module
    from ember.params import read_params_file
    from ember.report import publish

    params = validated_params(target, profile, overrides)
    module = experiment_module(read_params_file(target)["experiment"])
    began = time.perf_counter()
    df, provenance = module.run(params, progress)
    return publish(params, df, provenance, {"experiment_s": time.perf_counter() - began})


def lab_command(port: int = 8888, token: str | None = None) -> list[str]:
    """The JupyterLab server command line `make lab` runs: headless (no browser), bound to localhost, rooted at the
    repository, allowed for root users (most containers) as for others; it prints its URL with the token. A
    `token` fixes the token instead of a random one."""
    import sys

    command = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={port}",
               "--allow-root", f"--ServerApp.root_dir={REPO_ROOT}"]
    return command + ([f"--IdentityProvider.token={token}"] if token is not None else [])


CHECK_MARK = "NBVAL_CHECK_OUTPUT"


def store_checked_outputs(target: str, executed: Path) -> int:
    """Copy the outputs of `# NBVAL_CHECK_OUTPUT` cells from an executed run into the stored notebook (all
    other outputs stay stripped), so nbval compares those cells for real. Returns the cells updated."""
    import nbformat

    source = notebook_for(target)
    stored = nbformat.read(source, as_version=4)
    ran = nbformat.read(executed, as_version=4)
    checked_ran = [c for c in ran.cells if c.cell_type == "code" and CHECK_MARK in c.source]
    updated = 0
    for cell in (c for c in stored.cells if c.cell_type == "code"):
        if CHECK_MARK in cell.source:
            match = next((c for c in checked_ran if c.source == cell.source), None)
            if match is None:
                raise ReportError(f"{source.name}: checked cell not found in {executed}")
            cell.outputs, cell.execution_count = match.outputs, 1
            updated += 1
        else:
            cell.outputs, cell.execution_count = [], None
    tmp = source.with_suffix(".ipynb.tmp")
    nbformat.write(stored, tmp)
    os.replace(tmp, source)
    return updated


def refresh_checks(target: str) -> int:
    """Run a target's notebook at smoke in a scratch folder and store its checked outputs."""
    import tempfile

    with tempfile.TemporaryDirectory() as scratch:
        previous = os.environ.get("EMBER_OUT_ROOT")
        os.environ["EMBER_OUT_ROOT"] = scratch
        try:
            executed = run_notebook(target, "smoke", "", progress=False)
            return store_checked_outputs(target, executed)
        finally:
            if previous is None:
                os.environ.pop("EMBER_OUT_ROOT")
            else:
                os.environ["EMBER_OUT_ROOT"] = previous
