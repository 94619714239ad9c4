"""Judge scores cached on disk, so a rerun, another summary or another threshold never judges a pair again.

A score is keyed by the judge's name and version (its prompt or string list, matching rule and threshold:
``JudgeSpec.version``), the goal and the completion (``storage.digest``), so editing a judge's prompt or list
re-judges instead of serving scores of the old rule; each judge's scores live in one file named after its
spec. Both the key and the file name are pinned by tests: changing either re-judges every cached run.
"""

from __future__ import annotations

import gc
import hashlib
import re
from collections.abc import Sequence
from pathlib import Path

from ..storage import digest, read_jsonl, write_jsonl
from .spec import from_spec, parse_spec

__all__ = ["cached_scores", "cache_path", "slug"]


def slug(text: str) -> str:
    """``text`` as a file or folder name: unsafe runs become ``_``; a long one is cut and keeps a hash of the whole."""
    s = re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_")
    return s if len(s) <= 60 else f"{s[:48]}_{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def cache_path(folder: Path, spec: str) -> Path:
    return folder / f"judge-{slug(spec)}.jsonl"


def cached_scores(spec: str, pairs: Sequence[tuple[str, str]], cache_path: Path, *, dtype: str | None = None,
                  device: str | None = None, device_map: str | None = None) -> list[float]:
    """The scores of the judge of ``spec`` on (goal, completion) pairs, loading it only for pairs ``cache_path``
    lacks (and freeing it after)."""
    parsed = parse_spec(spec)
    name, version = parsed.name, parsed.version
    cache = {r["key"]: r["score"] for r in read_jsonl(cache_path)} if cache_path.exists() else {}
    keys = [digest([name, version, goal, completion]) for goal, completion in pairs]
    todo = {k: pair for k, pair in zip(keys, pairs) if k not in cache}
    if todo:
        judge = from_spec(spec, dtype=dtype, device=device, device_map=device_map)
        cache.update(zip(todo, judge.scores([g for g, _ in todo.values()], [c for _, c in todo.values()])))
        write_jsonl(cache_path, [{"key": k, "score": v} for k, v in cache.items()])
        del judge
        gc.collect()
    return [cache[k] for k in keys]
