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
    assert not any(path.startswith("docs/runs/") for path in saved["files"])  # results may stay behind
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


@pytest.mark.parametrize("override, message", [
    ("context_lens=[-1]", "Params.context_lens: expected a value >= 1, found -1"),
    ("gen_lens=[]", "Params.gen_lens: expected at least one value, found \\[\\]"),
    ("repeats=0", "Params.repeats: expected a value >= 1, found 0"),
    ("warmup=-1", "Params.warmup: expected a value >= 0, found -1"),
    ("temperature=-0.5", "Params.temperature: expected a value >= 0.0, found -0.5"),
    ("dtype=int8", "Params.dtype: expected one of \\['float32', 'bfloat16', 'float16'\\], found 'int8'"),
    ("device=gpu", "Params.device: expected auto, cpu, cuda or cuda:N, found 'gpu'"),
])
def test_params_out_of_range_are_errors(override, message):
    """Hardening #9: `context_lens=[-1]`, `repeats=0` ... ended in raw tracebacks deep in the run."""
    with pytest.raises(ParamsError, match=message):
        load_params("fig2", "smoke", override)


def test_every_experiment_declares_ranges():
    """Each experiment's int / float fields (and grids) carry a `param(...)` range, so new ones cannot forget."""
    import dataclasses
    import typing

    from ember.experiments import EXPERIMENTS, experiment_module

    for name in EXPERIMENTS:
        cls = experiment_module(name).Params
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if hints[f.name] in (int, float, tuple[int, ...], tuple[float, ...]):
                assert "range" in f.metadata, f"{name}.Params.{f.name} declares no range"


def test_range_and_validate_hook_on_a_new_params_class():
    from ember.params import RunParams, param

    @dataclass(frozen=True)
    class Grid(RunParams):
        lens: tuple[int, ...] = param((4,), low=1, high=8)
        mode: str = param("a", choices=("a", "b"))

        def validate(self):
            super().validate()
            if self.mode == "b" and len(self.lens) > 1:
                raise ParamsError("Grid: mode b takes one length")

    assert build(Grid, {"lens": [1, 8]}).lens == (1, 8)
    with pytest.raises(ParamsError, match="Grid.lens: expected a value <= 8, found 9"):
        build(Grid, {"lens": [9]})
    with pytest.raises(ParamsError, match="Grid.mode: expected one of"):
        build(Grid, {"mode": "c"})
    with pytest.raises(ParamsError, match="mode b takes one length"):
        build(Grid, {"mode": "b", "lens": [1, 2]})
    with pytest.raises(ParamsError, match="Grid.device: expected auto, cpu, cuda or cuda:N"):
        build(Grid, {"device": "tpu"})


def test_missing_device_is_an_error_before_any_work(monkeypatch, capsys):
    """Hardening #9: `device=cuda` on a CPU machine is an `ember: error:` line before the model loads."""
    import torch

    from ember import cli

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr("ember.models.load", lambda *a, **k: pytest.fail("must not load a model"))
    assert cli.main(["run", "fig2", "--profile", "smoke", "--set", "device=cuda:1"]) == 2
    assert "ember: error: device 'cuda:1': expected CUDA device 1 on this machine, found 0" in capsys.readouterr().err
    assert cli.main(["run", "fig2", "--profile", "smoke", "--set", "repeats=0"]) == 2
    assert "ember: error: Params.repeats: expected a value >= 1, found 0" in capsys.readouterr().err
    from ember.notebooks import validated_params

    assert validated_params("fig2", "paper", measure=False).device == "cuda"  # --reuse renders a GPU run here
    with pytest.raises(ParamsError, match="device 'cuda': expected CUDA device 0 on this machine, found 0"):
        validated_params("fig2", "paper")


def test_figure_validates_before_starting_a_kernel(tmp_path, monkeypatch, capsys):
    """Hardening #10: `ember figure ... --set repeats=abc` started Jupyter and left a .running notebook."""
    import papermill

    from ember import cli

    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    monkeypatch.setattr(papermill, "execute_notebook", lambda *a, **k: pytest.fail("must not start a kernel"))
    for override in ("repeats=abc", "context_lens=[-1]"):
        assert cli.main(["figure", "fig2", "--profile", "smoke", "--set", override]) == 2
        assert "ember: error: Params." in capsys.readouterr().err
    assert list(tmp_path.rglob("*.ipynb")) == []


def test_failed_notebook_leaves_no_partial_file(tmp_path, monkeypatch):
    """Hardening #10: a run that fails in a cell removes its `.running.ipynb`."""
    import papermill

    from ember.notebooks import run_notebook

    def failing(source, partial, **kwargs):
        Path(partial).write_text("{}")
        raise RuntimeError("cell failed")

    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    monkeypatch.setattr(papermill, "execute_notebook", failing)
    with pytest.raises(RuntimeError, match="cell failed"):
        run_notebook("fig2", "smoke", progress=False)
    assert list(tmp_path.rglob("*.ipynb")) == []
