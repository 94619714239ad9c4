"""Runs stages in order, skipping those already done with the same inputs.

Each stage writes into its own folder and finishes by writing ``stage.json``: its fingerprint and
a new result id. The fingerprint is derived from what the stage declares it depends on: the config
values it reads and the result ids of the stages whose outputs it reads, so nothing it depends on
can be forgotten. A stage whose marker matches is skipped; one whose inputs changed is recomputed,
and its new result id makes every stage that reads it recompute. A crash leaves a ``running``
marker and the finished stages untouched; the next run resumes that stage (training and attacks
resume inside it) when its inputs are unchanged. Stages of an earlier config that this config no
longer has, or has with other inputs, go to ``stale/`` (one copy per stage), finished or interrupted, and
come back, to be skipped or resumed, if a later config asks for exactly them again.
"""

from __future__ import annotations

import logging
import random
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from ..storage import digest, read_json, write_json

__all__ = ["Stage", "Runner", "now", "read_marker"]

log = logging.getLogger("refat.pipeline")


@dataclass
class Stage:
    """One step of the plan: ``run(context, folder)`` writes its outputs into ``folder``."""

    name: str  # its folder under the run, e.g. "train/refat"
    run: Callable[[Any, Path], None]
    config: dict = field(default_factory=dict)  # the config values it reads
    reads: tuple[str, ...] = ()  # the stages whose outputs it reads

    def inputs(self, results: dict[str, str]) -> dict:
        return {"config": self.config, "reads": {name: results[name] for name in self.reads}}


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def read_marker(folder: Path) -> dict | None:
    try:
        return read_json(folder / "stage.json")
    except (OSError, ValueError):
        return None


def _prune_empty(folder: Path, stop: Path) -> None:
    """Remove ``folder`` and its parents below ``stop`` while they are empty (attacks/<defense>, stale/...)."""
    while folder != stop and folder.is_dir() and not any(folder.iterdir()):
        folder.rmdir()
        folder = folder.parent


class Runner:
    """Runs a plan's stages over one run folder; ``report`` says what happened to each (for provenance)."""

    def __init__(self, run_dir: Path, *, force: Sequence[str] = (), seed: int = 0):
        self.run_dir, self.force, self.seed = run_dir, list(force), seed
        self.report: dict[str, dict] = {}

    def forced(self, name: str) -> bool:
        return any(name == f or name.startswith(f.rstrip("/") + "/") for f in self.force)

    def retire_stale(self, planned: set[str]) -> None:
        """Move stage folders the plan does not have to stale/ (the report must not show them)."""
        for marker in sorted(self.run_dir.rglob("stage.json")):
            rel = marker.parent.relative_to(self.run_dir)
            if rel.parts[0] == "stale" or rel.as_posix() in planned:
                continue
            self._shelve(rel.as_posix())
            log.info("[stage %s] not in this config: moved to stale/", rel.as_posix())
            _prune_empty(marker.parent.parent, self.run_dir)

    def _shelve(self, name: str) -> None:
        """Move stage folder ``name`` to stale/, replacing the copy an earlier config left there."""
        target = self.run_dir / "stale" / name
        shutil.rmtree(target, ignore_errors=True)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(self.run_dir / name), str(target))

    def _restore(self, name: str, fingerprint: str) -> dict | None:
        """This stage as stale/ holds it, if an earlier config left it there with these inputs: a finished one to be
        skipped, an interrupted one to resume (a training run's checkpoints are not thrown away because a narrower
        config ran in between). A copy with other inputs in its place goes to stale/, not away: switching back and
        forth between two configs recomputes nothing."""
        folder, old = self.run_dir / name, self.run_dir / "stale" / name
        marker = read_marker(old)
        back = bool(marker) and marker.get("status") in ("done", "running") and marker.get("fingerprint") == fingerprint
        if back:  # out of the way of the copy that takes its place in stale/
            shutil.move(str(old), str(aside := old.with_name(f"{old.name}.{uuid.uuid4().hex[:8]}")))
        if read_marker(folder):
            self._shelve(name)
            log.info("[stage %s] inputs changed: the earlier result moved to stale/", name)
        if not back:
            return None
        folder.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(aside), str(folder))
        _prune_empty(aside.parent, self.run_dir)
        return marker

    def run(self, stages: Sequence[Stage], context: Any) -> dict[str, str]:
        """Every stage in order; returns each one's result id."""
        results: dict[str, str] = {}
        for stage in stages:
            results[stage.name] = self._run(stage, stage.inputs(results), context)
        return results

    def _run(self, stage: Stage, inputs: dict, context: Any) -> str:
        name, fp = stage.name, digest(inputs)
        folder = self.run_dir / name
        marker, forced = read_marker(folder), self.forced(name)
        if not forced and (marker or {}).get("fingerprint") != fp:
            marker = self._restore(name, fp)
        if marker and marker.get("status") == "done" and marker.get("fingerprint") == fp and not forced:
            log.info("[stage %s] skipped (unchanged)", name)
            self.report[name] = {"status": "skipped", "result": marker["result"]}
            return marker["result"]
        if marker and marker.get("status") == "running" and marker.get("fingerprint") == fp and not forced:
            log.info("[stage %s] resuming an interrupted run", name)
        elif folder.exists():
            log.info("[stage %s] %s: recomputing", name, "forced" if forced else "inputs changed")
            shutil.rmtree(folder)
        else:
            log.info("[stage %s] running", name)
        folder.mkdir(parents=True, exist_ok=True)
        base = {"stage": name, "fingerprint": fp, "inputs": inputs, "started": now()}
        write_json(folder / "stage.json", {**base, "status": "running"})
        random.seed(self.seed)  # every stage starts from the run's seed, whatever ran before it
        torch.manual_seed(self.seed)
        # CPU time is what the stage cost, however long it waited on a busy machine or sat paused
        t0, cpu0 = time.perf_counter(), time.process_time()
        try:
            stage.run(context, folder)
        except BaseException as e:  # the marker stays "running": the next run resumes or redoes this stage
            self.report[name] = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
            log.error("[stage %s] failed after %.1f s: %s: %s", name, time.perf_counter() - t0, type(e).__name__, e)
            raise
        seconds, cpu_seconds = round(time.perf_counter() - t0, 1), round(time.process_time() - cpu0, 1)
        result = digest([fp, uuid.uuid4().hex])  # new on every computation: the stages reading it recompute
        write_json(folder / "stage.json", {**base, "status": "done", "result": result, "seconds": seconds,
                                           "cpu_seconds": cpu_seconds, "finished": now()})
        log.info("[stage %s] done in %.1f s (%.1f CPU-seconds, all threads)", name, seconds, cpu_seconds)
        self.report[name] = {"status": "ran", "result": result, "seconds": seconds}
        return result
