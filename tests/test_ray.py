"""A grid fanned out over a local Ray cluster of two workers: the same rows as a serial run (non-timing
columns), each computed row naming its worker, and a worker that dies mid-grid makes its cell re-run, not
vanish or duplicate. Needs the `ray` extra (`make test-ray`); skipped without it."""

import pandas as pd
import pytest

from ember.experiments import budget_curves
from ember.params import load_params

ray = pytest.importorskip("ray")

OVERRIDES = "items=2 caps=[256] methods=[alone,text:raw,kv:front:int8]"  # five cells


@pytest.fixture
def local_cluster(monkeypatch):
    monkeypatch.setenv("EMBER_RAY", "local:2")
    yield
    ray.shutdown()


def _comparable(df: pd.DataFrame) -> pd.DataFrame:
    keep = [c for c in df.columns if not c.endswith("_ms") and c != "worker"]
    return df[keep].reset_index(drop=True)


def test_a_grid_on_two_ray_workers_equals_the_serial_run_even_when_a_worker_dies(tmp_path, monkeypatch,
                                                                                 local_cluster):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "serial"))
    monkeypatch.delenv("EMBER_RAY")
    serial, _ = budget_curves.run(load_params("fig7", "smoke", OVERRIDES), progress=False)
    monkeypatch.setenv("EMBER_RAY", "local:2")
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "ray"))
    monkeypatch.setenv("EMBER_FAULT_ONCE", str(tmp_path / "fault"))  # the first task's worker exits hard
    fanned, provenance = budget_curves.run(load_params("fig7", "smoke", OVERRIDES), progress=False)
    assert (tmp_path / "fault").is_dir()  # the fault happened, and its cell was computed on a retry
    cells = sorted((tmp_path / "ray" / "reports" / "fig7" / "cells").glob(f"{provenance['run_key']}-*.csv"))
    assert len(cells) == 5  # each cell once
    assert fanned["worker"].notna().all()
    pd.testing.assert_frame_equal(_comparable(fanned), _comparable(serial))
