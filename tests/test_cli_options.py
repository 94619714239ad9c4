"""Commands' options come from their config dataclasses: every field is reachable with the dataclass's
default, and every config refuses a bad value, naming the field, before any model is loaded."""

import argparse
import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin, get_type_hints

import pytest
import yaml

from refat.attacks import REGISTRY
from refat.cli import DIRECTIONS_DATA, DIRECTIONS_SELECTION, TRAIN_ALIASES, _train_config, build_parser
from refat.configs import ConfigError, FieldError, from_arguments, from_dict
from refat.data import DataConfig
from refat.directions import SelectionConfig
from refat.evals.overrefusal import OverRefusalConfig
from refat.evals.utility import UtilityConfig
from refat.pipeline.demo import demo_config
from refat.training import AdversarialConfig, LoraSettings, RefatConfig, TrainConfig


def subparser(parser: argparse.ArgumentParser, *names: str) -> argparse.ArgumentParser:
    for name in names:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


def leaves(cls: type, path: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted path, type, default) of every field, nested dataclasses' fields flattened."""
    out = []
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            out += leaves(hints[f.name], f"{path}{f.name}.")
        else:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            out.append((path + f.name, hints[f.name], default))
    return out


def candidates(hint: Any, default: Any) -> list[Any]:
    """Values other than ``default`` to set a field of type ``hint`` to, most ordinary first."""
    union = get_origin(hint) in (typing.Union, types.UnionType)
    kind = next(a for a in get_args(hint) if a is not type(None)) if union else hint
    if kind is bool:
        return [not default]
    if get_origin(kind) is Literal:
        return [c for c in get_args(kind) if c != default]
    if get_origin(kind) in (list, tuple):
        items = candidates(get_args(kind)[0], None)
        return [get_origin(kind)(items[:2]), get_origin(kind)(items[2:])]
    if kind is str:
        return ["q_proj", "v_proj"] if default is None else [default + "x"]
    if default is None:
        return [kind(1), kind(2), kind(-1), kind(-2)]
    near = (default + 1, default - 1) if kind is int else (default / 2, default * 2, 0.5)
    return [v for v in near if v != default]


def tokens(option: str, value: Any) -> list[str]:
    if isinstance(value, bool):
        return [option if value else "--no-" + option[2:]]
    if isinstance(value, (list, tuple)):
        return [option, *map(str, value)]
    return [option, "none" if value is None else str(value)]


def replaced(config: Any, path: str, value: Any) -> Any:
    head, _, rest = path.partition(".")
    return dataclasses.replace(config, **{head: replaced(getattr(config, head), rest, value) if rest else value})


KNOWN = {"strategies": [("roleplaying",)]}  # fields whose valid values candidates() cannot guess


def check_options_reach_config(argv: list[str], cls: type, base: Any = None, **fixed: Any) -> None:
    """``argv`` (a command and its required options) gives ``base`` (the command's own defaults; by default
    ``cls(**fixed)``); then each field, set to a valid non-default value through ``--its-dotted-path`` (and to
    None through 'none' when optional), arrives."""
    parser = build_parser()
    base = cls(**fixed) if base is None else base
    assert from_arguments(cls, parser.parse_args(argv)) == base
    for path, hint, _ in leaves(cls):
        option = "--" + path.replace(".", "-").replace("_", "-")
        default = getattr_path(base, path)
        values = [v for v in KNOWN.get(path) or candidates(hint, default) if valid(base, path, v)][:1]
        if type(None) in get_args(hint) and default is not None:
            values.append(None)
        assert values, f"{path}: no valid non-default value to try"
        for value in values:
            args = parser.parse_args([*argv, *tokens(option, value)])
            assert from_arguments(cls, args) == replaced(base, path, value), (path, value)


def getattr_path(config: Any, path: str) -> Any:
    for name in path.split("."):
        config = getattr(config, name)
    return config


def valid(config: Any, path: str, value: Any) -> bool:
    try:
        replaced(config, path, value)
    except ValueError:
        return False
    return True


TRAIN = ["train", "--method", "rt", "--out", "x"]


def test_train_options_reach_every_train_config_field():
    check_options_reach_config(TRAIN, TrainConfig, method="rt")


def test_train_options_reach_every_data_config_field():
    check_options_reach_config(TRAIN, DataConfig)


def test_directions_options_reach_its_data_and_selection_configs():
    argv = ["directions", "--out", "x"]
    check_options_reach_config(argv, DataConfig, DIRECTIONS_DATA)
    check_options_reach_config(argv, SelectionConfig, DIRECTIONS_SELECTION)


@pytest.mark.parametrize("name", list(REGISTRY))
def test_attack_options_reach_every_field_of_its_config(name):
    entry = REGISTRY[name]
    argv = ["attack", name, "--out", "x", *(["--directions", "d"] if "directions" in entry.needs else [])]
    check_options_reach_config(argv, entry.config)


@pytest.mark.parametrize("section, cls", [("data", DataConfig), ("selection", SelectionConfig),
                                          ("train", TrainConfig)])
def test_run_and_demo_overrides_reach_every_field(section, cls):
    """`refat run CONFIG key=value` and `refat demo key=value`: any field of a section, checked like the file."""
    base = getattr(demo_config(), section)
    for path, hint, _ in leaves(cls):
        if f"{section}.{path}" in ("train.method", "train.seed"):
            continue  # each defense's own method, and the top-level `seeds` list: the file refuses both
        value = next((v for v in candidates(hint, getattr_path(base, path)) if valid(base, path, v)), None)
        if value is None:
            continue
        text = yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()
        got = getattr(demo_config(overrides=[f"{section}.{path}={text}"]), section)
        assert getattr_path(got, path) == (list(value) if isinstance(value, tuple) else value), path


def test_train_keeps_its_earlier_option_names():
    parser, base = build_parser(), TrainConfig()
    hints = {path: hint for path, hint, _ in leaves(TrainConfig)}
    for path, old in TRAIN_ALIASES.items():
        value = next(v for v in candidates(hints[path], getattr_path(base, path)) if valid(base, path, v))
        args = parser.parse_args([*TRAIN, old, str(value)])
        assert getattr_path(from_arguments(TrainConfig, args), path) == value, old


@pytest.mark.parametrize("method, section", [("refat", "refat"), ("cat", "adversarial"), ("lat", "adversarial")])
def test_train_layers_is_the_methods_own_layers(method, section):
    args = build_parser().parse_args(["train", "--method", method, "--out", "x", "--train-layers", "1", "2"])
    assert getattr(_train_config(args), section).layers == [1, 2]


def test_target_modules_take_one_value_or_several():
    parser = build_parser()
    one = from_arguments(TrainConfig, parser.parse_args([*TRAIN, "--lora-target-modules", ".*q_proj"]))
    several = from_arguments(TrainConfig, parser.parse_args([*TRAIN, "--lora-target-modules", "q_proj", "v_proj"]))
    assert (one.lora.target_modules, several.lora.target_modules) == (".*q_proj", ["q_proj", "v_proj"])


def test_train_options_are_torchrun_safe():
    """No abbreviations accepted, and no option abbreviates one of torchrun's (torchrun would take it)."""
    from torch.distributed.run import get_args_parser

    parser = subparser(build_parser(), "train")
    assert parser.allow_abbrev is False
    with pytest.raises(SystemExit):
        build_parser().parse_args([*TRAIN, "--ste", "3"])
    theirs = [s for a in get_args_parser()._actions for s in a.option_strings if s.startswith("--")]
    ours = [s for a in parser._actions for s in a.option_strings if s.startswith("--") and s != "--help"]
    assert not [(o, t) for o in ours for t in theirs if t.startswith(o)]


def test_bad_option_value_names_field_and_option():
    args = build_parser().parse_args([*TRAIN, "--refat-p", "1.5"])
    with pytest.raises(ConfigError, match=r"refat\.p \(--refat-p\): must be in \[0, 1\]"):
        from_arguments(TrainConfig, args)


BAD = [
    (TrainConfig, {"steps": -5}, "steps"), (TrainConfig, {"batch_size": 1}, "batch_size"),
    (TrainConfig, {"grad_accum": 0}, "grad_accum"), (TrainConfig, {"lr": 0.0}, "lr"),
    (TrainConfig, {"warmup_steps": -1}, "warmup_steps"), (TrainConfig, {"max_grad_norm": 0.0}, "max_grad_norm"),
    (TrainConfig, {"weight_decay": -0.1}, "weight_decay"), (TrainConfig, {"max_length": 0}, "max_length"),
    (TrainConfig, {"checkpoint_every": 0}, "checkpoint_every"), (TrainConfig, {"schedule": "cyclic"}, "schedule"),
    (TrainConfig, {"method": "sft"}, "method"),
    (LoraSettings, {"r": 0}, "r"), (LoraSettings, {"alpha": 0}, "alpha"), (LoraSettings, {"dropout": 1.0}, "dropout"),
    (LoraSettings, {"target_modules": []}, "target_modules"),
    (RefatConfig, {"p": 1.5}, "p"), (RefatConfig, {"k": 0}, "k"), (RefatConfig, {"n": 0}, "n"),
    (RefatConfig, {"mode": "zero"}, "mode"), (RefatConfig, {"position": 0}, "position"),
    (RefatConfig, {"layers": [2, -1]}, "layers"),
    (AdversarialConfig, {"epsilon": 0.0}, "epsilon"), (AdversarialConfig, {"steps": 0}, "steps"),
    (AdversarialConfig, {"step_size": 0.0}, "step_size"), (AdversarialConfig, {"away_weight": -1.0}, "away_weight"),
    (AdversarialConfig, {"layers": [-2]}, "layers"),
    (SelectionConfig, {"prune_layer_fraction": 1.0}, "prune_layer_fraction"),
    (SelectionConfig, {"screen_prompts": 0}, "screen_prompts"), (SelectionConfig, {"screen_keep": 0}, "screen_keep"),
    (SelectionConfig, {"batch_size": 0}, "batch_size"), (SelectionConfig, {"layers": [-1]}, "layers"),
    (SelectionConfig, {"positions": [0]}, "positions"),
    (UtilityConfig, {"tasks": []}, "tasks"), (UtilityConfig, {"n_per_task": 0}, "n_per_task"),
    (UtilityConfig, {"batch_size": 0}, "batch_size"), (UtilityConfig, {"few_shot": -1}, "few_shot"),
    (UtilityConfig, {"gsm8k_max_new_tokens": 0}, "gsm8k_max_new_tokens"), (UtilityConfig, {"source": "s3"}, "source"),
    (UtilityConfig, {"evaluator": "helm"}, "evaluator"), (UtilityConfig, {"lm_eval_tasks": "tasks/"}, "lm_eval_tasks"),
    (OverRefusalConfig, {"dataset": ""}, "dataset"), (OverRefusalConfig, {"n": 0}, "n"),
    (OverRefusalConfig, {"max_new_tokens": 0}, "max_new_tokens"), (OverRefusalConfig, {"batch_size": 0}, "batch_size"),
    (DataConfig, {"n_train": -1}, "n_train"), (DataConfig, {"n_val": -1}, "n_val"),
    (DataConfig, {"n_test": -1}, "n_test"), (DataConfig, {"harmful": ""}, "harmful"),
]


@pytest.mark.parametrize("cls, values, field", BAD, ids=[f"{c.__name__}.{f}" for c, _, f in BAD])
def test_configs_refuse_bad_values_naming_the_field(cls, values, field):
    with pytest.raises(FieldError) as e:
        cls(**values)
    assert e.value.field == field
    with pytest.raises(ConfigError, match=rf"^section\.{field}: "):
        from_dict(cls, values, "section")


def test_yaml_train_section_fails_before_any_model():
    data = yaml.safe_load("train: {steps: -5, refat: {p: 0.5}}")
    with pytest.raises(ConfigError, match=r"^train\.steps: must be >= 1, got -5"):
        from_dict(TrainConfig, data["train"], "train")
    with pytest.raises(ConfigError, match=r"^train\.refat\.p: must be in \[0, 1\]"):
        from_dict(TrainConfig, {"refat": {"p": 2}}, "train")


def test_layer_checks_that_need_the_model_name_their_section():
    with pytest.raises(FieldError, match=r"^refat\.layers: layer\(s\) \[4\] out of range 0\.\.3"):
        TrainConfig(refat=RefatConfig(layers=[4])).validate(4)
    with pytest.raises(FieldError, match=r"^adversarial\.layers"):
        TrainConfig(method="lat", adversarial=AdversarialConfig(layers=[7])).validate(4)
    TrainConfig(refat=RefatConfig(layers=[3])).validate(4)
