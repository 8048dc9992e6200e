"""The paper's sources (no LaTeX needed): every quoted macro is one an experiment writes, no number is typed
into the prose, figures and tables are catalog targets with their commands in the appendix, and the build's
bookkeeping (what is missing, strict mode) is right. Negative tests run the checks on crafted bad sources."""

from __future__ import annotations

import json
import re
import shutil

import pandas as pd
import pytest

from ember.errors import ReportError
from ember.paper import build as paper_build
from ember.paper.runs import CATALOG, MACRO_WRITERS, RUNS_DIR, known_macros, run_params, stored_runs
from ember.paper.sources import PAPER_DIR, check_sources, paper_uses, prose_digits, source_files, uses
from ember.report import REPO_ROOT, Fixed, params_difference, write_macros


@pytest.fixture(scope="module")
def known():
    return known_macros()


def _paper(tmp_path, body: str, appendix: str = "\\texttt{make fig2 PROFILE=paper}"):
    """A crafted paper folder: main.tex inputting one section and the appendix."""
    (tmp_path / "sections").mkdir(parents=True)
    (tmp_path / "main.tex").write_text("\\documentclass[10pt]{article}\n\\begin{document}\n"
                                       "\\input{sections/body}\n\\input{sections/reproducibility}\n\\end{document}\n")
    (tmp_path / "sections" / "body.tex").write_text(body)
    (tmp_path / "sections" / "reproducibility.tex").write_text(appendix)
    return tmp_path


def test_the_paper_sources_are_sound(known):
    assert check_sources(known) == []


def test_the_paper_quotes_macros_of_every_built_part_a_target():
    used = {m for found in paper_uses().values() for m in found.macros}
    for prefix in ("figTwo", "figThree", "figFour", "figFive", "figSix", "figSeven", "tabOne"):
        assert any(m.startswith(prefix) for m in used), prefix


def test_every_committed_run_has_a_macro_writer_and_writes_macros():
    runs = stored_runs()
    assert {json.loads((r / "manifest.json").read_text())["target"] for r in runs} <= set(MACRO_WRITERS)
    assert len(known_macros()) > 100


def test_a_macro_no_experiment_writes_fails(tmp_path, known):
    paper = _paper(tmp_path, "Prefill takes \\val{figTwoPrefillShareMax}\\% and \\val{figTwoPrefillShareMaxx}\\%.")
    problems = check_sources(known, paper)
    assert len(problems) == 1 and "figTwoPrefillShareMaxx" in problems[0] and "no" in problems[0]


def test_a_typed_number_fails(tmp_path, known):
    paper = _paper(tmp_path, "KeepStale saves 42\\% of rollout time.\n")
    problems = check_sources(known, paper)
    assert len(problems) == 1 and "body.tex:1" in problems[0] and "42" in problems[0]


def test_a_number_spelled_with_a_decimal_point_or_in_a_caption_fails(tmp_path, known):
    paper = _paper(tmp_path, "\\emberfigure{fig2}{Prefill is 0.5 of the time.}\n")
    assert any("0.5" in p for p in check_sources(known, paper))


def test_digits_allowed_outside_prose():
    text = ("\\documentclass[10pt]{article}\n\\begin{document}\n"
            "% a comment with 42\nSee Section~\\ref{sec:a1} and \\cite{ref2024} \\label{fig:fig2}.\n"
            "Qwen2.5-0.5B sends KVWire v1 blobs in int8; run \\texttt{make fig2 REUSE=1}: \\val{figTwoPrefillShareMax}"
            "\\% in \\emberfigure{fig2}{caption} and a 50\\% escaped percent sign after.\n\\end{document}\n")
    digits = prose_digits(text)
    assert [d.line for d in digits] == [5] and "50" in digits[0].context


def test_a_bare_generated_macro_fails(tmp_path, known):
    paper = _paper(tmp_path, "Prefill takes \\figTwoPrefillShareMax\\%.\n")
    problems = check_sources(known, paper)
    assert len(problems) == 1 and "\\val{figTwoPrefillShareMax}" in problems[0]


def test_a_figure_of_no_target_and_a_command_missing_from_the_appendix_fail(tmp_path, known):
    paper = _paper(tmp_path, "\\emberfigure{fig9}{x}\n\\emberfigure{fig3}{x}\n")
    problems = check_sources(known, paper)
    assert any("fig9: expected a figure or table of one of" in p for p in problems)
    assert any("make fig3 PROFILE=paper" in p for p in problems)


def test_a_missing_section_is_named(tmp_path):
    paper = _paper(tmp_path, "")
    (paper / "sections" / "body.tex").unlink()
    with pytest.raises(ReportError, match="inputs 'sections/body'; expected .*body.tex"):
        source_files(paper)


def test_main_loads_the_macros_of_every_catalog_target_and_the_appendix_gives_every_command():
    main = (PAPER_DIR / "main.tex").read_text()
    loaded = re.search(r"\\embermacros\{([^}]*)\}", main).group(1).split(",")
    assert sorted(loaded) == sorted(CATALOG)
    appendix = (PAPER_DIR / "sections" / "reproducibility.tex").read_text()
    for target in CATALOG.values():
        assert target.command in appendix


def test_the_macro_writers_are_what_the_notebooks_publish():
    for target in MACRO_WRITERS:
        notebook = next((REPO_ROOT / "notebooks").glob(f"{target}_*.ipynb")).read_text()
        assert "macros=" in notebook and ".macros(" in notebook, target


def test_run_params_leave_out_a_renamed_parameter():
    manifest = json.loads((RUNS_DIR / "fig4-paper-h200" / "manifest.json").read_text())
    assert "reward_tolerance" in manifest["params"]
    assert run_params(manifest).frozen_fractions == tuple(manifest["params"]["frozen_fractions"])


def test_params_difference_names_expected_found_and_stale_keys():
    text = params_difference({"a": 1, "b": [1, 2], "new": 3}, {"params": {"a": 1, "b": [1], "old": 0.5}})
    assert "b: expected [1, 2], found [1]" in text
    assert "old: found 0.5 in the run, but this code has no such parameter" in text
    assert "new: expected 3, the run has no such parameter" in text and "a:" not in text


def test_missing_outputs_and_strict_mode(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    missing = paper_build.find_missing()
    used = {m for found in paper_uses().values() for m in found.macros}
    assert "fig2" in missing.figures and "tab1_policies" in missing.tables and set(missing.macros) == used
    assert missing.macros["figTwoPrefillShareMax"] == "fig2"
    with pytest.raises(ReportError, match=r"figure fig2: not yet run \(make fig2\)[\s\S]*"
                                          r"macro \\figTwoPrefillShareMax: not in paper/generated/fig2.tex"):
        paper_build.build(strict=True)  # refused before any LaTeX runs
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "fig2.pdf").write_bytes(b"%PDF-1.4\n")
    write_macros("fig2", {"figTwoPrefillShareMax": 13.5, "figTwoPrefillShareMin": 1.2})
    again = paper_build.find_missing()
    assert "fig2" not in again.figures and not {"figTwoPrefillShareMax", "figTwoPrefillShareMin"} & set(again.macros)


def test_a_bare_macro_refuses_to_build_even_without_strict(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path / "out"))
    paper = _paper(tmp_path / "paper", "Prefill takes \\figTwoPrefillShareMax\\%.\n")
    with pytest.raises(ReportError, match=r"used without \\val"):
        paper_build.build(paper_dir=paper)


def test_uses_ignore_comments():
    found = uses("% \\val{figTwoGone} \\emberfigure{fig9}{x} 42\n\\val{figTwoPrefillShareMax}\n")
    assert found.macros == ("figTwoPrefillShareMax",) and found.figures == () and found.digits == ()


def test_write_macros_keeps_one_decimal_and_a_fixed_value_its_own(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBER_OUT_ROOT", str(tmp_path))
    text = write_macros("tab1", {"a": 0.9612, "b": Fixed(0.9612, 3), "c": 7, "d": "none", "e": Fixed(2, 0)}).read_text()
    assert "\\newcommand{\\a}{1.0}" in text and "\\newcommand{\\b}{0.961}" in text
    assert "\\newcommand{\\c}{7}" in text and "\\newcommand{\\d}{none}" in text and "\\newcommand{\\e}{2}" in text
    with pytest.raises(ReportError, match="finite"):
        write_macros("tab1", {"x": Fixed(float("nan"), 2)})


def test_tab1_tables_escape_underscores():
    from ember.experiments import strategies

    folder = RUNS_DIR / "tab1-paper-h200-qwen0.5b-r4"
    df = pd.read_csv(folder / "results.csv")
    params = run_params(json.loads((folder / "manifest.json").read_text()))
    tables = strategies.latex_tables(strategies.policy_table(df, params), strategies.ladder_table(df, params),
                                     strategies.stack_table(df, params))
    assert "best\\_of\\_n" in tables["tab1_ladder"]
    for latex in tables.values():
        assert not re.search(r"(?<!\\)_", latex)


def test_the_latex_engine_check_names_what_is_missing(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda tool: None)
    assert set(paper_build.missing_latex()) == set(paper_build.TOOLS)
    with pytest.raises(ReportError, match="found neither them nor apt-get"):
        paper_build.ensure_latex(log=lambda line: None)
