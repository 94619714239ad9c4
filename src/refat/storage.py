"""Atomic file output: a reader, or a run killed mid-write, never sees a half-written file. And the content
digest that keys cached results."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from pathlib import Path

from .errors import RefatError

__all__ = ["digest", "file_digest", "atomic_path", "atomic_dir", "replacing", "write_text", "write_json", "write_jsonl",
           "read_json", "read_jsonl", "FinishedRunError", "claim_output", "FolderLockedError", "folder_lock"]


class FinishedRunError(RefatError, FileExistsError):
    pass


def digest(obj, n: int = 16) -> str:
    """The first ``n`` hex digits of the sha256 of ``obj`` as canonical JSON (sorted keys; ``str`` for anything
    JSON lacks). Cache keys and stage fingerprints are these: changing it invalidates every stored run."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def file_digest(path: str | Path) -> str:
    """The full sha256 of a file's bytes (read in 1 MiB blocks: a model's weights never sit in memory twice)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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
def atomic_dir(path: str | Path, *, replace: bool = True, main: bool = True):
    """Yield a fresh temporary folder beside ``path``; it becomes ``path`` only if the block succeeds
    (an existing ``path`` is replaced when ``replace``, else refused). ``main``: False on the other
    processes of a sharded run, which only write into the folder the main process makes and moves
    (the caller makes them wait for it)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.partial")
    if not main:
        yield tmp
        return
    if path.exists() and not replace and any(path.iterdir()):
        raise FileExistsError(f"{path} is not empty; choose another output directory")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted run
    tmp.mkdir(parents=True)
    try:
        yield tmp
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


LOCK_NAME = ".lock"


@contextmanager
def replacing(folder: str | Path, *, keep: Sequence[str] = (), main: bool = True):
    """Yield a fresh sibling of ``folder`` (``.<name>.new``) that replaces ``folder`` only when the block succeeds:
    ``--overwrite`` writes the new result beside the old one, so a run killed or failing midway leaves the old
    result intact. ``keep``: files of ``folder`` copied into the sibling first (cached inputs such as training
    pairs); the folder's lock file moves with the swap. ``main``: False on the other processes of a
    data-parallel run, which only write into the sibling that the main process prepares and swaps.

    The swap is two renames; a run killed between them leaves ``.<name>.old``, which the next call puts back."""
    folder = Path(folder)
    new, old = folder.with_name(f".{folder.name}.new"), folder.with_name(f".{folder.name}.old")
    if not main:
        yield new
        return
    if old.exists() and not folder.exists():  # a swap interrupted between its two renames
        os.replace(old, folder)
    shutil.rmtree(old, ignore_errors=True)
    shutil.rmtree(new, ignore_errors=True)  # left by an interrupted --overwrite run
    new.mkdir(parents=True, exist_ok=True)  # another rank of a data-parallel run may have made it
    for name in keep:
        if (folder / name).is_file():
            shutil.copy2(folder / name, new / name)
    try:
        yield new
        if (folder / LOCK_NAME).exists():
            os.replace(folder / LOCK_NAME, new / LOCK_NAME)
        if folder.exists():
            os.replace(folder, old)
        os.replace(new, folder)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(new, ignore_errors=True)


def write_text(path: str | Path, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def write_json(path: str | Path, obj) -> Path:
    return write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    return write_text(path, "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))


def read_json(path: str | Path):
    """A JSON file's content; a file that is not JSON is an error naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None


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


class FolderLockedError(RefatError, RuntimeError):
    """Another live process writes into this folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


@contextmanager
def folder_lock(folder: str | Path):
    """Hold ``folder/.lock`` (the holder's pid) for the block: a second writer gets a clear error instead of
    interleaving its outputs with the first's. A lock whose process is gone (killed) is taken over."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / LOCK_NAME
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            break
        except FileExistsError:
            try:
                holder = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                raise FolderLockedError(f"{folder} is in use by process {holder} (lock file {lock}); wait for it to "
                                        "finish, or remove the lock file if that process is not refat") from None
            lock.unlink(missing_ok=True)  # stale: its process is gone
    else:
        raise FolderLockedError(f"could not take the lock {lock}")
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield folder
    finally:
        lock.unlink(missing_ok=True)
