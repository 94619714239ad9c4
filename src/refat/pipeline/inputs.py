"""Every model, file and dataset a config names, checked (cheap checks first) and loaded before any stage."""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..attacks.base import Behaviour
from ..configs import ConfigError
from ..data import (
    DatasetError,
    Example,
    PromptSets,
    affirmative_target,
    drop_near_duplicates,
    load_dataset,
    prompt_key,
    prompt_sets,
)
from ..evals.overrefusal import OVERREFUSAL_SETS
from ..judges import parse_spec
from ..models import check_spec
from ..storage import digest
from .config import HARMLESS_TEST, ExperimentConfig

__all__ = ["Inputs", "resolve_inputs", "check_model"]


@dataclass
class Inputs:
    sets: PromptSets
    behaviours: list[Behaviour]  # the held-out harmful behaviours every attack draws from
    hashes: dict  # of every dataset and split: part of the data stage's fingerprint
    # `behaviours` left out as near duplicates of a training or extraction prompt: (example, closest prompt,
    # similarity); empty when the filter is off or `behaviours` is the harmful dataset's own test split
    near_duplicates: list[tuple[Example, str, float]] = field(default_factory=list)
    validation: list[str] = field(default_factory=list)  # the attacker's harmful validation prompts


    def harmless_test(self, n: int | None = None) -> list[str]:
        return self.sets.prompts("harmless", "test")[:n]


def check_model(spec: str, key: str) -> None:
    try:
        check_spec(spec)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def _have(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _dataset(spec: str, key: str) -> list[Example]:
    try:
        return load_dataset(spec)
    except (DatasetError, OSError, ImportError) as e:
        raise ConfigError(f"{key}: {e}") from None


def _examples_hash(examples: Sequence[Example]) -> str:
    return digest([e.to_dict() for e in examples])


def _check_files(cfg: ExperimentConfig, base_model: bool) -> None:
    if base_model:
        check_model(cfg.model, "model")
    for i, j in enumerate(cfg.judges):
        for model in parse_spec(j, f"judges[{i}]").models:
            check_model(model, f"judges[{i}]")
    for i, a in enumerate(cfg.attacks):
        check = getattr(a.parsed(), "check_inputs", None)  # an attack config may check the files it names
        if check is not None:
            try:
                check()
            except ValueError as e:
                raise ConfigError(f"attacks[{i}].config.{e}") from None
    for i, o in enumerate(cfg.overrefusals):
        spec, key = o.config.dataset, "overrefusal" if o.label is None else f"overrefusal[{i}]"
        if spec == HARMLESS_TEST:
            if cfg.data.n_test < 1:
                raise ConfigError(f"{key}.dataset: {HARMLESS_TEST} is the run's held-out harmless split, and "
                                  "data.n_test is 0")
            continue
        if spec not in OVERREFUSAL_SETS and not spec.startswith("hf:") and not _local_file(spec):
            raise ConfigError(f"{key}.dataset: {spec!r} is not one of {', '.join(OVERREFUSAL_SETS)}, "
                              f"{HARMLESS_TEST}, an existing file, or 'hf:org/name'")
        if (spec in ("xstest", "or-bench-hard") or spec.startswith("hf:")) and not _have("datasets"):
            raise ConfigError(f"{key}.dataset: {spec} is read from the hub: pip install 'refat[hub]'")
    if cfg.utility is not None and cfg.utility.evaluator == "lm-eval":
        if not _have("lm_eval"):
            raise ConfigError("utility.evaluator: 'lm-eval' needs lm-evaluation-harness: pip install 'refat[lm-eval]'")
        folder = cfg.utility.lm_eval_tasks
        if folder is not None and not Path(folder).expanduser().is_dir():
            raise ConfigError(f"utility.lm_eval_tasks: {folder} is not a folder (of lm-eval task YAMLs)")
    elif cfg.utility is not None:
        if cfg.utility.source == "hub" and not _have("datasets"):
            raise ConfigError("utility.source: 'hub' needs the datasets package: pip install 'refat[hub]'")
        if cfg.utility.source == "offline" and "mmlu" in cfg.utility.tasks and not _have("pyarrow"):
            raise ConfigError("utility.tasks: offline MMLU is stored as Arrow files and needs pyarrow (pip install "
                              "pyarrow), or drop mmlu (arc_easy, arc_challenge, hellaswag, gsm8k need nothing)")


def _local_file(spec: str) -> bool:
    return Path(spec).expanduser().is_file()


def resolve_inputs(cfg: ExperimentConfig, *, base_model: bool = True) -> Inputs:
    """Check every model, file and dataset the config names (cheap checks first), load the data and
    split it; raises ConfigError naming the key. ``base_model=False``: the caller passes the model loaded."""
    _check_files(cfg, base_model)
    harmful, harmless = _dataset(cfg.data.harmful, "data.harmful"), _dataset(cfg.data.harmless, "data.harmless")
    try:
        sets = prompt_sets(cfg.data, harmful, harmless)
    except DatasetError as e:
        raise ConfigError(f"data: {e}") from None
    dropped = []
    if cfg.behaviours is None:
        pool = sets.harmful["test"]
    else:  # anything of the harmful training dataset outside its test split stays out of the evaluation
        test = {prompt_key(e.prompt) for e in sets.harmful["test"]}
        used = [e.prompt for e in harmful if prompt_key(e.prompt) not in test]  # training, extraction, selection
        seen = {prompt_key(p) for p in used}
        pool = [e for e in _dataset(cfg.behaviours, "behaviours") if prompt_key(e.prompt) not in seen]
        if cfg.near_duplicates is not None:  # and paraphrases of it: a leaked behaviour flatters every defense
            pool, dropped = drop_near_duplicates(pool, used, cfg.near_duplicates)
    behaviours = [Behaviour(e.prompt, e.target or affirmative_target(e.prompt)) for e in pool]
    for i, a in enumerate(cfg.attacks):
        if not behaviours:
            raise ConfigError(f"attacks[{i}]: no held-out behaviours to attack (data.n_test is 0, or every "
                              "prompt of `behaviours` is used for training or selection)")
        if a.n_behaviours is not None and a.n_behaviours > len(behaviours):
            raise ConfigError(f"attacks[{i}].n_behaviours: {a.n_behaviours} > the {len(behaviours)} "
                              "held-out behaviours")
    hashes = {"harmful": _examples_hash(harmful), "harmless": _examples_hash(harmless),
              "behaviours": digest([asdict(b) for b in behaviours]),
              "splits": {f"{kind}/{s}": _examples_hash(xs) for kind in ("harmful", "harmless")
                         for s, xs in getattr(sets, kind).items()}}
    if cfg.validation is None:
        validation = sets.prompts("harmful", "val")
    else:  # a separate set (HarmBench val beside HarmBench test): never one of the attacked behaviours
        attacked = {prompt_key(b.goal) for b in behaviours}
        validation = [e.prompt for e in _dataset(cfg.validation, "validation") if prompt_key(e.prompt) not in attacked]
        if not validation:
            raise ConfigError(f"validation: every prompt of {cfg.validation!r} is an attacked behaviour")
        hashes["validation"] = digest(validation)
    return Inputs(sets, behaviours, hashes, dropped, validation)
