"""Reading the paper's LaTeX sources: which generated macros, figures and tables they use, and whether a
number was typed into the prose.

Conventions the sources follow (paper/ember.sty defines the commands):

* a number is quoted only as `\\val{macroName}`, a macro some experiment writes into paper/generated/;
* a figure is `\\emberfigure{fig2}{caption}` (figures/fig2.pdf, a "not yet run" box while it is missing);
* a generated table is `\\embertable{tab1_policies}{caption}` (paper/generated/tab1_policies.tex).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ReportError
from ember.paper.runs import CATALOG
from ember.report import REPO_ROOT

PAPER_DIR = REPO_ROOT / "paper"

_DIGIT_WORDS = "Zero|One|Two|Three|Four|Five|Six|Seven|Eight|Nine"
# a generated macro name: the target's prefix with its digit spelled out (ember.report.macro_name)
GENERATED = re.compile(rf"\\((?:fig|tab)(?:{_DIGIT_WORDS})[A-Za-z]*)")
VAL = re.compile(r"\\val\{([^{}]*)\}")
FIGURE = re.compile(r"\\emberfigure\{([^{}]*)\}")
TABLE = re.compile(r"\\embertable\{([^{}]*)\}")
INPUT = re.compile(r"\\input\{([^{}]*)\}")

# Spans a digit may sit in: a macro argument, a citation, a cross-reference, a label, a file name.
_SPANS = re.compile(r"\\(?:val|cite[pt]?|ref|eqref|autoref|label|input|emberfigure|embertable|bibliography"
                    r"|bibliographystyle|usepackage|documentclass)(?:\[[^\]]*\])?\{[^{}]*\}")
# Names with digits the prose may mention: models, the wire format, GPUs, number formats, make variables.
ALLOWED = ("Qwen2.5-0.5B", "Qwen2.5-1.5B", "Qwen3-4B", "SmolLM2-135M", "KVWire v1", "H100", "H200", "int4",
           "int8", "fp16", "bf16", "UTF-8", "REUSE=1", "STRICT=1", "STALE=1")


def strip_comments(text: str) -> str:
    """The text with every LaTeX comment (an unescaped % to the end of its line) removed; lines are kept."""
    return re.sub(r"(?<!\\)%.*", "", text)


def source_files(paper_dir: Path = PAPER_DIR) -> list[Path]:
    """main.tex and the files it \\input-s (sections), in order; a missing one is an error naming it."""
    main = Path(paper_dir) / "main.tex"
    if not main.is_file():
        raise ReportError(f"paper: expected the paper's source at {main}, found none")
    files = [main]
    for name in INPUT.findall(strip_comments(main.read_text())):
        path = Path(paper_dir) / (name if name.endswith(".tex") else f"{name}.tex")
        if path.parent.name != "sections":
            continue  # generated inputs are not sources
        if not path.is_file():
            raise ReportError(f"paper: main.tex inputs {name!r}; expected {path}, found none")
        files.append(path)
    return files


@dataclass(frozen=True)
class Digit:
    """A digit found in the prose: where, and the words around it."""

    path: Path
    line: int
    context: str

    def __str__(self) -> str:
        return f"{self.path.name}:{self.line}: {self.context!r}"


@dataclass(frozen=True)
class Uses:
    """What one source file uses: generated macros through \\val, generated macros written bare, figures,
    tables, and digits typed into its prose."""

    macros: tuple[str, ...]
    bare_macros: tuple[str, ...]
    figures: tuple[str, ...]
    tables: tuple[str, ...]
    digits: tuple[Digit, ...]


def body(text: str) -> str:
    """The document body: the text after \\begin{document} if there is one (the preamble is not prose), the
    preamble's lines blanked so line numbers stay right."""
    marker = text.find("\\begin{document}")
    if marker < 0:
        return text
    return re.sub(r"[^\n]", "", text[:marker]) + text[marker:]


def prose_digits(text: str, path: Path = Path("<source>"), allowed=ALLOWED) -> list[Digit]:
    """Digits in the prose of a source: outside comments, the preamble, macro arguments, citations, references,
    labels, file names, the allow-list and the catalog's target names (`make fig2`)."""
    clean = _SPANS.sub("", body(strip_comments(text)))
    words = sorted(set(allowed) | set(CATALOG), key=len, reverse=True)
    clean = re.sub("|".join(rf"(?<![A-Za-z0-9]){re.escape(w)}(?![A-Za-z0-9])" for w in words), "", clean)
    found = []
    for number, line in enumerate(clean.splitlines(), start=1):
        for match in re.finditer(r"\d+(?:[.,]\d+)*", line):  # one per number
            found.append(Digit(path, number, line[max(0, match.start() - 30): match.end() + 30].strip()))
    return found


def uses(text: str, path: Path = Path("<source>")) -> Uses:
    """What a source's text uses (comments ignored)."""
    clean = strip_comments(text)
    bare = tuple(dict.fromkeys(GENERATED.findall(clean)))  # \val{name} has no backslash before the name
    return Uses(tuple(dict.fromkeys(VAL.findall(clean))), bare, tuple(dict.fromkeys(FIGURE.findall(clean))),
                tuple(dict.fromkeys(TABLE.findall(clean))), tuple(prose_digits(text, path)))


def paper_uses(paper_dir: Path = PAPER_DIR) -> dict[Path, Uses]:
    """What each source file of the paper uses."""
    return {path: uses(path.read_text(), path) for path in source_files(paper_dir)}


def defined_macros(text: str) -> set[str]:
    """Macro names a generated file defines with \\newcommand."""
    return set(re.findall(r"\\newcommand\{\\([A-Za-z]+)\}", text))


def check_sources(known: set[str] | dict, paper_dir: Path = PAPER_DIR) -> list[str]:
    """Problems of the sources, one line each (none: they are sound): a quoted macro that no experiment writes
    (`known`: the names the experiments' macro writers produce), a generated macro used without \\val, a digit
    typed into the prose, a figure or table of no catalog target, a shown target whose command the
    reproducibility appendix does not give."""
    problems = []
    shown = []
    for path, found in paper_uses(paper_dir).items():
        where = path.name
        problems += [f"{where}: \\val{{{m}}}: expected a macro some experiment writes, found none that does"
                     for m in found.macros if m not in known]
        problems += [f"{where}: \\{m}: expected \\val{{{m}}} (a bare macro breaks the build while it is missing)"
                     for m in found.bare_macros]
        problems += [f"{digit}: expected no digit in the prose (quote numbers with \\val{{...}})"
                     for digit in found.digits]
        for name in found.figures + found.tables:
            if name.split("_", 1)[0] not in CATALOG:
                problems.append(f"{where}: {name}: expected a figure or table of one of {sorted(CATALOG)}")
            else:
                shown.append(name.split("_", 1)[0])
    appendix = Path(paper_dir) / "sections" / "reproducibility.tex"
    text = strip_comments(appendix.read_text()) if appendix.is_file() else ""
    problems += [f"{appendix.name}: expected the command of {target} ({CATALOG[target].command}), found none"
                 for target in dict.fromkeys(shown) if CATALOG[target].command not in text]
    return problems
