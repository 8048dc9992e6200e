"""Params validation, overrides, atomic report writing, LaTeX macros, project-file consistency."""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from ember import report
from ember.errors import ParamsError, ReportError
from ember.params import build, load_params, parse_overrides, resolve

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Example:
    name: str
    sizes: tuple[int, ...] = (1,)
    rate: float = 0.5
    flag: bool = False
    label: str | None = None


def test_profiles_and_overrides_resolve():
    params = load_params("fig2", "smoke", "repeats=5 context_lens=[8, 16]")
    assert params.repeats == 5 and params.context_lens == (8, 16) and params.profile == "smoke"
    assert load_params("fig2", "paper").model == "qwen3-4b"


@pytest.mark.parametrize("values, message", [
    ({"name": "x", "typo": 1}, "unknown keys \\['typo'\\]"),
    ({}, "missing key 'name'"),
    ({"name": "x", "sizes": [1, "a"]}, "Example.sizes\\[\\]: expected int, found 'a'"),
    ({"name": "x", "rate": "fast"}, "Example.rate: expected float"),
    ({"name": "x", "flag": 1}, "Example.flag: expected bool"),
])
def test_build_rejects_bad_values(values, message):
    with pytest.raises(ParamsError, match=message):
        build(Example, values)


def test_build_coerces():
    ex = build(Example, {"name": "x", "sizes": 3, "rate": 1, "label": None})
    assert ex.sizes == (3,) and ex.rate == 1.0 and isinstance(ex.rate, float)


def test_bad_targets_profiles_overrides():
    with pytest.raises(ParamsError, match="known targets"):
        resolve("fig99")
    with pytest.raises(ParamsError, match="profile: expected one of"):
        resolve("fig2", "huge")
    with pytest.raises(ParamsError, match="expected key=value"):
        parse_overrides("repeats")
    with pytest.raises(ParamsError, match="unknown keys"):
        load_params("fig2", "smoke", "repaets=3")


def test_every_params_file_validates_in_every_profile():
    for path in sorted((ROOT / "params").glob("*.yaml")):
        for profile in yaml.safe_load(path.read_text())["profiles"]:
            load_params(path.stem, profile)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "a.json"
    report.atomic_write(target, "old")
    monkeypatch.setattr(report.os, "replace", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        report.atomic_write(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_macros(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    assert report.macro_name("fig2", "prefill share", "ctx", 2048) == "figTwoPrefillShareCtxTwoZeroFourEight"
    path = report.write_macros("fig2", {"figTwoX": 12.345, "figTwoN": 3})
    assert path.read_text().splitlines()[1:] == ["\\newcommand{\\figTwoX}{12.3}", "\\newcommand{\\figTwoN}{3}"]
    with pytest.raises(ReportError, match="finite"):
        report.write_macros("fig2", {"figTwoBad": float("nan")})
    with pytest.raises(ReportError):
        report.macro_name("--")


def test_manifest_records_provenance_and_code(tmp_path, monkeypatch):
    import pandas as pd

    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    params = load_params("fig2", "smoke")
    paths = report.publish(params, pd.DataFrame({"a": [1]}), {"random_weights": True, "device": "cpu"},
                           {"experiment_s": 1.0})
    manifest = json.loads(paths["manifest"].read_text())
    assert manifest["weights"]["random_weights"] is True
    assert manifest["params"]["model"] == "tiny-qwen3"
    assert set(manifest["versions"]) >= {"torch", "transformers", "python"}
    assert re.fullmatch(r"[0-9a-f]{40}|unknown", manifest["git"]["sha"])


def test_environment_yml_mirrors_pyproject():
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = set(project["dependencies"]) | set(project["optional-dependencies"]["dev"])
    wanted = {d for d in wanted if not d.startswith("torch")} | {"torch==2.13.0"}
    pip = next(d["pip"] for d in yaml.safe_load((ROOT / "environment.yml").read_text())["dependencies"]
               if isinstance(d, dict))
    assert set(pip) - {"-e ."} == wanted


def test_ci_runs_what_the_readme_says():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "make test" in ci and "make test" in (ROOT / "README.md").read_text()


def test_notebooks_are_stored_without_outputs_except_checked_cells():
    import nbformat

    for path in (ROOT / "notebooks").glob("*.ipynb"):
        nb = nbformat.read(path, as_version=4)
        assert any("parameters" in c.metadata.get("tags", []) for c in nb.cells), path
        for cell in (c for c in nb.cells if c.cell_type == "code"):
            checked = "NBVAL_CHECK_OUTPUT" in cell.source
            assert bool(cell.outputs) == checked, f"{path.name}: outputs only (and always) in checked cells"


def test_git_state_uses_the_sha_stamped_before_shipping(tmp_path, monkeypatch):
    import subprocess

    assert report.git_state()["source"] == "git"
    stamp = tmp_path / ".ember-sha"
    monkeypatch.setattr(report, "SHIPPED_SHA_FILE", stamp)
    written = report.stamp_tree()
    saved = json.loads(stamp.read_text())
    assert saved["sha"] == written["sha"] and "ember/report.py" in saved["files"]
    assert report.git_state() == {**written, "source": "shipped"}  # the files are those stamped

    real_git = report._git

    def stale_git(*args):  # a copied tree whose .git is of another commit, which does not know the stamped one
        if args[0] == "cat-file":
            raise subprocess.CalledProcessError(128, "git")
        return "0" * 40 if args[0] == "rev-parse" else " M something"

    monkeypatch.setattr(report, "_git", stale_git)
    assert report.git_state()["sha"] == written["sha"]

    def moved_on(*args):  # this checkout knows the stamped commit and has a newer HEAD: git speaks
        return "1" * 40 if args[0] == "rev-parse" else real_git(*args)

    monkeypatch.setattr(report, "_git", moved_on)
    assert report.git_state()["sha"] == "1" * 40
    monkeypatch.setattr(report, "_git", stale_git)
    saved["tree_hash"] = "0" * 64  # the files changed since the stamp: the stamp no longer speaks for them
    stamp.write_text(json.dumps(saved))
    assert report.git_state() == {"sha": "0" * 40, "dirty": True, "source": "git"}
    saved["tree_hash"], saved["files"] = None, ["no/such/file"]  # a stamp over a missing file never matches
    stamp.write_text(json.dumps(saved))
    assert report.git_state()["source"] == "git"

    def no_git(*args, **kwargs):
        raise subprocess.CalledProcessError(128, "git")

    monkeypatch.setattr(report, "_git", no_git)
    assert report.git_state()["sha"] == "unknown"
    with pytest.raises(ReportError, match="expected a git checkout"):
        report.stamp_tree()


def test_reuse_refuses_a_run_of_unknown_sha_unless_marked_stale(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    monkeypatch.setattr(report, "git_state", lambda: {"sha": "unknown", "dirty": None, "source": None})
    params = load_params("fig2", "smoke")
    report.publish(params, pd.DataFrame({"a": [1]}), {"device": "cpu"}, {"experiment_s": 1.0})
    with pytest.raises(ReportError, match="records no git SHA .* \\(STALE=1"):
        report.load_results(params)
    df, manifest = report.load_results(params, allow_stale=True)
    assert manifest["stale"] and df["a"].tolist() == [1]
    fig = plt.figure()
    paths = report.publish(params, df, manifest["weights"], manifest["timings_s"], fig=fig, manifest=manifest)
    assert "STALE" in "".join(t.get_text() for t in fig.texts)
    assert json.loads(paths["manifest"].read_text())["stale"] == manifest["stale"]


def test_benchmark_json_goes_through_the_manifest_builder():
    from ember.bench import kvwire

    out = kvwire.run(layers=1, heads=1, head_dim=8, tokens=4, device="cpu", repeats=1)
    assert {"git", "versions", "device", "params", "created"} <= set(out)
    assert out["target"] == "bench-kvwire" and out["params"]["tokens"] == 4


@pytest.mark.parametrize("override", ["target=fig6", "profile=paper"])
def test_target_and_profile_cannot_be_overridden(override):
    """Hardening #8: `--set target=fig6` wrote fig2's results into reports/fig6."""
    with pytest.raises(ParamsError, match="cannot be set"):
        load_params("fig2", "smoke", override)


def test_ember_raises_only_errors_of_its_family():
    """Hardening #14: ValueError / RuntimeError / TypeError raised on purpose escape `except EmberError`."""
    offenders = []
    for path in (ROOT / "ember").rglob("*.py"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(r"raise (ValueError|RuntimeError|TypeError|KeyError)\(", line):
                offenders.append(f"{path.relative_to(ROOT)}:{number}")
    assert offenders == []
    from ember.errors import DatasetError, EmberError
    from ember.tasks import datasets

    assert datasets.DatasetError is DatasetError and issubclass(DatasetError, EmberError)
