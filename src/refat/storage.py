"""Atomic file output: a reader, or a run killed mid-write, never sees a half-written file. And the content
digest that keys cached results."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_path", "atomic_dir", "write_text", "write_json", "write_jsonl", "read_jsonl", "FinishedRunError",
           "claim_output", "digest"]


class FinishedRunError(FileExistsError):
    pass


@contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path``; move it into place only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes files private; give them ordinary permissions
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextmanager
def atomic_dir(path: str | Path, *, replace: bool = True):
    """Yield a fresh temporary folder beside ``path``; it becomes ``path`` only if the block succeeds
    (an existing ``path`` is replaced when ``replace``, else refused)."""
    path = Path(path)
    if path.exists() and not replace and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty; choose another output directory")
    tmp = path.with_name(f".{path.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_jsonl(path: str | Path) -> list[dict]:
    # split on "\n" only: str.splitlines also breaks at \x1c-\x1e, \x85 and \u2028, which JSON leaves unescaped
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").split("\n") if line.strip()]


def claim_output(out_dir: str | Path, finished_marker: str, *, overwrite: bool = False) -> Path:
    """Make ``out_dir``; refuse one that holds a finished result unless ``overwrite``."""
    out = Path(out_dir)
    if (out / finished_marker).exists() and not overwrite:
        raise FinishedRunError(f"{out} already holds a finished result ({finished_marker}); "
                               "pass --overwrite to replace it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    return out


def digest(obj, n: int = 16) -> str:
    """The first ``n`` hex digits of the sha256 of ``obj`` as canonical JSON (sorted keys; ``str`` for anything
    JSON lacks). Cache keys and stage fingerprints are these: changing it invalidates every stored run."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]
