"""Building paper/main.pdf: a LaTeX engine from Debian packages when missing, what the sources need that no run
has made yet (figures, tables, macros), pdflatex + bibtex in a build folder, the PDF renamed into place.

The sources live in paper/ (the repository); what runs made is read from the output root
(`ember.report.output_root()`: figures/, paper/generated/), and the build folder and PDF are written there too.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from ember.errors import ReportError
from ember.paper.runs import CATALOG, target_of
from ember.paper.sources import PAPER_DIR, defined_macros, paper_uses
from ember.report import atomic_write, output_root

APT_PACKAGES = ("texlive-latex-base", "texlive-latex-recommended", "poppler-utils")
TOOLS = ("pdflatex", "bibtex", "kpsewhich", "pdftoppm")
STYLES = ("booktabs.sty", "xcolor.sty", "hyperref.sty", "graphicx.sty", "geometry.sty", "microtype.sty",
          "caption.sty", "natbib.sty")
_SAFE_PATH = re.compile(r"^[A-Za-z0-9/._-]+$")


def figures_dir() -> Path:
    """Where runs put their figures."""
    return output_root() / "figures"


def generated_dir() -> Path:
    """Where runs put the paper's macros and tables."""
    return output_root() / "paper" / "generated"


def build_dir() -> Path:
    """Where LaTeX runs (aux files, logs)."""
    return output_root() / "paper" / "build"


def pdf_path() -> Path:
    """The built paper."""
    return output_root() / "paper" / "main.pdf"


def missing_latex() -> list[str]:
    """The tools and LaTeX styles the build needs that this machine lacks."""
    lacking = [tool for tool in TOOLS if shutil.which(tool) is None]
    if shutil.which("kpsewhich"):
        for style in STYLES:
            found = subprocess.run(["kpsewhich", style], capture_output=True, text=True, timeout=30).stdout.strip()
            if not found:
                lacking.append(style)
    return lacking


def ensure_latex(log=print) -> None:
    """Install the LaTeX engine (Debian packages, through apt-get) when a tool or style is missing; nothing is
    done when everything is there. Raises ReportError naming what is missing where it cannot install."""
    lacking = missing_latex()
    if not lacking:
        return
    apt = shutil.which("apt-get")
    if apt is None:
        raise ReportError(f"paper: expected {', '.join(lacking)} (Debian packages {' '.join(APT_PACKAGES)}), found "
                          f"neither them nor apt-get; install a TeX Live with those")
    prefix = [] if os.geteuid() == 0 else (["sudo", "-n"] if shutil.which("sudo") else None)
    if prefix is None:
        raise ReportError(f"paper: missing {', '.join(lacking)}; installing {' '.join(APT_PACKAGES)} needs root, "
                          f"found a user without sudo")
    log(f"paper: installing {' '.join(APT_PACKAGES)} (missing: {', '.join(lacking)})")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in ([apt, "update", "-qq"], [apt, "install", "-y", "-qq", "--no-install-recommends", *APT_PACKAGES]):
        subprocess.run(prefix + command, check=True, env=env, timeout=1800)
    still = missing_latex()
    if still:
        raise ReportError(f"paper: expected {', '.join(still)} after installing {' '.join(APT_PACKAGES)}, "
                          f"found them still missing")


@dataclass
class Missing:
    """What the sources use that no run has generated yet, each with the command that makes it."""

    figures: list[str] = field(default_factory=list)
    tables: list[str] = field(default_factory=list)
    macros: dict[str, str] = field(default_factory=dict)  # macro -> its target
    bare_macros: list[str] = field(default_factory=list)  # used without \val: would break the build

    def __bool__(self) -> bool:
        return bool(self.figures or self.tables or self.macros or self.bare_macros)

    def lines(self) -> list[str]:
        """One line per missing thing, naming the command that generates it."""
        def run(target: str) -> str:
            return f"make {target}" + ("" if CATALOG[target].built else "; its experiment is not built yet")

        out = [f"figure {name}: not yet run ({run(target_of(name))})" for name in self.figures]
        out += [f"table {name}: not yet run ({run(target_of(name))})" for name in self.tables]
        out += [f"macro \\{name}: not in paper/generated/{target}.tex (make {target})"
                for name, target in self.macros.items()]
        out += [f"macro \\{name}: used without \\val{{...}} (write \\val{{{name}}})" for name in self.bare_macros]
        return out


def _macro_target(name: str) -> str:
    """The target whose macros file defines a generated macro: figTwoPrefillShareMax -> fig2."""
    words = ["Zero", "One", "Two", "Three", "Four", "Five", "Six", "Seven", "Eight", "Nine"]
    match = re.match(rf"(fig|tab)({'|'.join(words)})", name)
    return f"{match.group(1)}{words.index(match.group(2))}" if match else "?"


def find_missing(paper_dir: Path = PAPER_DIR) -> Missing:
    """Compare what the sources use with what is in figures/ and paper/generated/."""
    generated = generated_dir()
    defined: set[str] = set()
    if generated.is_dir():
        for path in sorted(generated.glob("*.tex")):
            defined |= defined_macros(path.read_text())
    missing = Missing()
    for found in paper_uses(paper_dir).values():
        missing.figures += [f for f in found.figures if not (figures_dir() / f"{f}.pdf").is_file()
                            and f not in missing.figures]
        missing.tables += [t for t in found.tables if not (generated / f"{t}.tex").is_file()
                           and t not in missing.tables]
        missing.macros.update({m: _macro_target(m) for m in found.macros if m not in defined})
        missing.bare_macros += [m for m in found.bare_macros if m not in missing.bare_macros]
    return missing


def _tex_path(path: Path) -> str:
    text = f"{path.resolve()}/"
    if not _SAFE_PATH.match(text):
        raise ReportError(f"paper: expected a folder path of letters, digits and / . _ - for LaTeX, found {text!r}")
    return text


def _run(command: list[str], cwd: Path, env: dict, what: str, log_file: Path) -> None:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        lines = done.stdout.splitlines()
        first = next((i for i, line in enumerate(lines) if line.startswith("!")), max(0, len(lines) - 15))
        tail = "\n".join(lines[first:first + 6])  # the error and the source line it stopped at
        raise ReportError(f"paper: {what} failed (exit {done.returncode}); see {log_file}:\n{tail}")


def build(strict: bool = False, paper_dir: Path = PAPER_DIR, log=print) -> Path:
    """paper/main.pdf from the sources, the figures and the generated macros and tables. Missing ones show
    as boxes and red marks; `strict` refuses to build while anything is missing, naming all of it."""
    missing = find_missing(paper_dir)
    if missing.bare_macros or (strict and missing):
        raise ReportError("paper: expected every figure, table and macro the sources use, found these missing:\n  "
                          + "\n  ".join(missing.lines()))
    ensure_latex(log)
    folder = build_dir()
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "ember-config.tex",
                 f"\\renewcommand\\emberfiguredir{{{_tex_path(figures_dir())}}}\n"
                 f"\\renewcommand\\embergendir{{{_tex_path(generated_dir())}}}\n"
                 + ("\\emberstricttrue\n" if strict else ""))
    sources = Path(paper_dir).resolve()
    env = {**os.environ, "TEXINPUTS": f"{folder}:{sources}:", "BIBINPUTS": f"{sources}:"}
    latex = ["pdflatex", "-interaction=nonstopmode", "-halt-on-error", f"-output-directory={folder}", "main.tex"]
    _run(latex, sources, env, "pdflatex", folder / "main.log")
    _run(["bibtex", "main"], folder, env, "bibtex", folder / "main.blg")
    _run(latex, sources, env, "pdflatex", folder / "main.log")
    _run(latex, sources, env, "pdflatex", folder / "main.log")
    pdf = atomic_write(pdf_path(), (folder / "main.pdf").read_bytes())
    for line in missing.lines():
        log(f"paper: missing {line}")
    log(f"paper: {pdf} ({_pages(folder / 'main.log')} pages)")
    return pdf


def _pages(log_path: Path) -> str:
    match = re.search(r"Output written on .*?\((\d+) pages?", log_path.read_text(errors="replace"))
    return match.group(1) if match else "?"
