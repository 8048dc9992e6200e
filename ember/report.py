"""Run outputs: atomic writes, manifests (params, versions, device, git SHA, timings, provenance), LaTeX macros.

Everything is written to a temporary file in the destination folder and renamed into place, so a crashed run
never leaves a file that looks finished. The output root is the repository, or `$EMBER_OUT_ROOT` (tests point
it at a scratch folder so they never overwrite real results).
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from ember.errors import ReportError

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_SHA_FILE = REPO_ROOT / ".ember-sha"  # written by `ember stamp` before a tree is copied to another machine
_DIGITS = ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"]


def output_root() -> Path:
    return Path(os.environ.get("EMBER_OUT_ROOT", REPO_ROOT))


def report_dir(target: str) -> Path:
    return output_root() / "reports" / target


def atomic_write(path: Path, data: bytes | str) -> Path:
    """Write bytes or text to `path` via a temp file in the same folder and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_directory(path: Path) -> Iterator[Path]:
    """A temporary folder beside `path` to fill; when the block succeeds it replaces `path` (an old one is
    removed first), when it fails it is removed and `path` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        yield tmp
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_figure(fig, target: str) -> list[Path]:
    """Save a matplotlib figure as figures/<target>.pdf and .png (atomically)."""
    paths = []
    for ext in ("pdf", "png"):
        path = output_root() / "figures" / f"{target}.{ext}"
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target}.", suffix=f".{ext}", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=200, bbox_inches="tight")
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        paths.append(path)
    return paths


def _git(*args: str) -> str:
    return subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10,
                          check=True).stdout.strip()


def _tree_hash(paths: list[str]) -> str | None:
    """sha256 over the paths and contents of files under the repository root (None if one is missing)."""
    digest = hashlib.sha256()
    for path in sorted(paths):
        try:
            data = (REPO_ROOT / path).read_bytes()
        except OSError:
            return None
        digest.update(f"{path}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def _stamp_speaks_for_tree(stamped: dict) -> bool:
    """Whether .ember-sha describes the files here: they hash as stamped, and the local git (if any) has not
    moved on from the stamped commit (a git that does not know that commit is a stale copy: the stamp wins)."""
    expected = stamped.get("tree_hash")
    if expected is None or _tree_hash(stamped["files"]) != expected:
        return False
    try:
        head = _git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        return True  # no git here: a shipped copy
    if head == stamped["sha"]:
        return True
    try:
        _git("cat-file", "-e", f"{stamped['sha']}^{{commit}}")
        return False  # this checkout has the stamped commit and has moved on: git speaks for it
    except (OSError, subprocess.SubprocessError):
        return True  # a copied .git of another commit


def git_state() -> dict:
    """Commit SHA of the code that runs and whether it had uncommitted changes.

    A tree copied to another machine (a GPU box) carries .ember-sha, written by `ember stamp` before it was
    shipped: while the files it lists still hash to what it recorded (and no local git has moved past it), its
    SHA is the answer, whatever a copied .git says. Otherwise the checkout's git state; 'unknown' when there is
    neither.
    """
    try:
        stamped = json.loads(SHIPPED_SHA_FILE.read_text())
        if _stamp_speaks_for_tree(stamped):
            return {"sha": str(stamped["sha"]), "dirty": stamped["dirty"], "source": "shipped"}
    except (OSError, ValueError, KeyError, TypeError):
        pass
    try:
        return {**_checkout_state(), "source": "git"}
    except (OSError, subprocess.SubprocessError):
        return {"sha": "unknown", "dirty": None, "source": None}


def _checkout_state() -> dict:
    """HEAD and whether tracked files differ from it (raises where there is no git checkout)."""
    return {"sha": _git("rev-parse", "HEAD"), "dirty": _git("status", "--porcelain", "--untracked-files=no") != ""}


RESULTS_DIR = "docs/runs/"  # committed results, not code: a shipped copy may leave them behind (a smaller tree)


def stamp_tree() -> dict:
    """Write the checkout's git SHA, dirty flag and a hash of its tracked files (all but the committed results
    under docs/runs/) into .ember-sha (atomically), for runs made on a copy of the tree. Returns the git state."""
    try:
        state = _checkout_state()
        files = [path for path in _git("ls-files").splitlines() if not path.startswith(RESULTS_DIR)]
    except (OSError, subprocess.SubprocessError) as error:
        raise ReportError(f"stamp: expected a git checkout at {REPO_ROOT}, found none ({error})") from error
    stamp = {**state, "files": files, "tree_hash": _tree_hash(files)}
    atomic_write(SHIPPED_SHA_FILE, json.dumps(stamp) + "\n")
    return state


def device_info(device: str = "cpu") -> dict:
    """What ran the numbers: the GPU name, or the CPU model and thread count."""
    import torch

    info = {"device": str(device), "torch_threads": torch.get_num_threads(), "machine": platform.machine()}
    if str(device).startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
        info["cuda"] = torch.version.cuda
    try:
        models = [line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")]
        info["cpu"] = models[0] if models else platform.processor()
        info["cpu_count"] = len(models) or os.cpu_count()
    except OSError:
        info["cpu"] = platform.processor()
    return info


def versions() -> dict:
    import importlib.metadata as metadata

    found = {"python": sys.version.split()[0]}
    for name in ("ember", "torch", "transformers", "pandas", "numpy", "seaborn", "papermill"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = None
    return found


def run_manifest(target: str, params: dict, provenance: dict, device: str, timings: dict | None = None,
                 profile: str | None = None, extra: dict | None = None) -> dict:
    """The manifest of any run (figure, benchmark, evaluation): what was asked, with what code and weights,
    on what, and how long it took."""
    return {
        "target": target,
        "profile": profile,
        "params": params,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "git": git_state(),
        "versions": versions(),
        "device": device_info(device),
        "weights": provenance,
        "timings_s": timings or {},
        **(extra or {}),
    }


def build_manifest(params, provenance: dict, timings: dict, device: str, extra: dict | None = None) -> dict:
    """The manifest of a figure run from its params dataclass."""
    return run_manifest(params.target, dataclasses.asdict(params), provenance, device, timings, params.profile, extra)


def write_results(target: str, df, manifest: dict) -> dict[str, Path]:
    """Write reports/<target>/results.csv, then manifest.json (last: its presence marks a finished run)."""
    folder = report_dir(target)
    csv = atomic_write(folder / "results.csv", df.to_csv(index=False))
    man = atomic_write(folder / "manifest.json", json.dumps(manifest, indent=2, default=str) + "\n")
    return {"results": csv, "manifest": man}


def macro_name(*parts) -> str:
    """A LaTeX command name from parts: words in camelCase, digits spelled out.

    macro_name("fig2", "prefill share", "ctx", 2048) -> "figTwoPrefillShareCtxTwoZeroFourEight".
    """
    name = ""
    for part in parts:
        for word in str(part).replace("-", " ").replace("_", " ").replace(".", " ").split():
            spelled = "".join(_DIGITS[int(ch)] if ch.isdigit() else ch for ch in word if ch.isalnum())
            name += spelled[:1].upper() + spelled[1:] if name else spelled
    if not name or not name.isalpha() or not name.isascii():
        raise ReportError(f"macro name: expected ASCII letters or digits in {parts!r}, found {name!r}")
    return name


@dataclasses.dataclass(frozen=True)
class Fixed:
    """A macro value that carries its own precision: `Fixed(0.912, 3)` prints 0.912 where a plain float
    would be rounded to write_macros' `digits` (a reward of 0.96 printing 1.0)."""

    value: float
    digits: int


def write_macros(target: str, values: dict[str, float | int | str | Fixed], digits: int = 1) -> Path:
    """paper/generated/<target>.tex: one \\newcommand per value (floats rounded to `digits` decimals, a
    `Fixed` value to its own)."""
    lines = [f"% generated by ember for {target}; do not edit\n"]
    for name, value in values.items():
        places = digits
        if isinstance(value, Fixed):
            value, places = float(value.value), value.digits
        if isinstance(value, float):
            if not math.isfinite(value):
                raise ReportError(f"macro {name}: expected a finite number, found {value}")
            value = f"{value:.{places}f}"
        lines.append(f"\\newcommand{{\\{name}}}{{{value}}}\n")
    return atomic_write(output_root() / "paper" / "generated" / f"{target}.tex", "".join(lines))


def latex_escaped(table):
    """The table (a pandas DataFrame) with LaTeX's special characters escaped in its text cells (`best_of_n` ->
    `best\\_of\\_n`)."""
    import pandas

    def escape(value):
        return re.sub(r"([&%$#_{}])", r"\\\1", value) if isinstance(value, str) else value

    return table.apply(lambda column: column if pandas.api.types.is_numeric_dtype(column) else column.map(escape))


def write_table(name: str, latex: str) -> Path:
    """paper/generated/<name>.tex: a generated LaTeX table (atomically)."""
    path = output_root() / "paper" / "generated" / f"{name}.tex"
    return atomic_write(path, f"% generated by ember; do not edit\n{latex}")


def publish(params, df, provenance: dict, timings: dict, fig=None, macros: dict | None = None,
            extra: dict | None = None, manifest: dict | None = None) -> dict[str, Path]:
    """Write every output of a figure run: results.csv + manifest.json, figures/<target>.pdf|png, macros.

    `manifest` keeps an existing run's manifest (re-rendering results measured elsewhere, e.g. on a GPU); a
    manifest marked stale (see `load_results`) puts a visible note on the figure."""
    if manifest is None:
        manifest = build_manifest(params, provenance, timings, provenance.get("device", "cpu"), extra)
    paths = {}
    if fig is not None:
        if manifest.get("stale"):
            fig.text(0.5, 0.005, f"STALE: {manifest['stale']}", ha="center", va="bottom", color="firebrick",
                     fontsize=9, fontweight="bold")
        paths["figures"] = save_figure(fig, params.target)
    if macros:
        paths["macros"] = write_macros(params.target, macros)
    paths.update(write_results(params.target, df, manifest))
    return paths


def params_difference(wanted: dict, manifest: dict) -> str:
    """How a stored run's params differ from the wanted ones: per key the value expected and the one found;
    a key the run has that this code does not know is a renamed or removed parameter (stale: re-run), a key
    the code has that the run lacks was added since (re-run, or set it to the run's implicit default)."""
    found = manifest.get("params") or {}
    parts = []
    for key in sorted(set(wanted) | set(found)):
        if key not in wanted:
            parts.append(f"{key}: found {found[key]!r} in the run, but this code has no such parameter (renamed or "
                         f"removed since: the run is stale)")
        elif key not in found:
            parts.append(f"{key}: expected {wanted[key]!r}, the run has no such parameter (added since)")
        elif wanted[key] != found[key]:
            parts.append(f"{key}: expected {wanted[key]!r}, found {found[key]!r}")
    return "; ".join(parts)


def load_results(params, allow_stale: bool = False) -> tuple:
    """(results DataFrame, manifest) of a finished run of exactly these params, for re-rendering a figure
    without re-running it. Raises ReportError if there is none, its params differ, or the code that made it
    is unknown (no git SHA); `allow_stale` renders the last anyway, marked stale in manifest and figure."""
    import pandas as pd

    folder = report_dir(params.target)
    manifest_path, csv_path = folder / "manifest.json", folder / "results.csv"
    if not manifest_path.exists() or not csv_path.exists():
        raise ReportError(f"reuse: expected a finished run in {folder} (results.csv + manifest.json), found none")
    manifest = json.loads(manifest_path.read_text())
    wanted = json.loads(json.dumps(dataclasses.asdict(params), default=str))
    if manifest.get("params") != wanted:
        raise ReportError(f"reuse: the run in {folder} has other params: {params_difference(wanted, manifest)}")
    sha = (manifest.get("git") or {}).get("sha", "unknown")
    if sha == "unknown":
        if not allow_stale:
            raise ReportError(f"reuse: the run in {folder} records no git SHA (expected the commit that made it, "
                              f"found 'unknown'); re-run it, or render it anyway marked stale (STALE=1 / "
                              f"--allow-stale)")
        manifest["stale"] = "made by code of unknown git SHA"
    manifest["rerendered"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return pd.read_csv(csv_path), manifest
