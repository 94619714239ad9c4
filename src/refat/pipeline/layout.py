"""Every path of a run folder, in one place: stage bodies and the report find each other's outputs here.

A stage's name is its folder relative to the run (``attacks/rt/gcg``), so ``Layout()`` (no root)
gives the names and ``Layout(run_dir)`` the paths. Per-model folders take a model's key
(:attr:`refat.pipeline.config.Subject.key`: ``refat``, or ``refat@seed1`` for another training seed).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..judges import slug

__all__ = ["Layout"]


@dataclass(frozen=True)
class Layout:
    root: Path = field(default_factory=Path)

    # the run's own files
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def provenance(self) -> Path:
        return self.root / "provenance.json"

    @property
    def log(self) -> Path:
        return self.root / "run.log"

    @property
    def cache(self) -> Path:
        return self.root / "cache"  # judge scores, kept across configs

    @property
    def stale(self) -> Path:
        return self.root / "stale"  # stages an earlier config had and this one does not

    # stage folders
    @property
    def data(self) -> Path:
        return self.root / "data"

    def directions(self, defense: str) -> Path:
        return self.root / "directions" / defense

    def pairs(self, key: str | None = None) -> Path:
        """The run's own pair options: ``pairs``; a variant's other options: ``pairs-<digest>`` (a sibling, never
        inside another stage's folder, which a recomputation deletes)."""
        return self.root / ("pairs" if key is None else f"pairs-{key}")

    def pairs_file(self, key: str | None = None) -> Path:
        return self.pairs(key) / "pairs.jsonl"

    def train(self, defense: str) -> Path:
        return self.root / "train" / defense

    def attack(self, defense: str, label: str) -> Path:
        return self.root / "attacks" / defense / label

    def records(self, defense: str, label: str) -> Path:
        return self.attack(defense, label) / "records.jsonl"

    def sweep(self, defense: str, label: str) -> Path:
        """A worst-case RFA attack's sweep (:meth:`refat.attacks.rfa_sweep.Sweep.load`): the ablation it chose."""
        return self.attack(defense, label) / "sweep.json"

    def utility(self, defense: str) -> Path:
        return self.root / "utility" / defense

    def overrefusal(self, defense: str, label: str | None = None) -> Path:
        """``overrefusal/<defense>`` for the single ``overrefusal:`` mapping, ``overrefusal/<defense>/<label>`` for
        each set of a list."""
        return self.root / "overrefusal" / defense / (label or "")

    def analysis(self, defense: str) -> Path:
        return self.root / "analysis" / defense

    def judge(self, spec: str) -> Path:
        return self.root / "judges" / slug(spec)

    @property
    def report(self) -> Path:
        return self.root / "report"  # the tables (asr.json, ...), report.md, report.html, plots/

    def name(self, folder: Path) -> str:
        """The stage name of one of this layout's folders."""
        return folder.relative_to(self.root).as_posix()
