"""Strict config parsing: unknown keys and wrong types are named; command-line options mirror the fields."""

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from refat.configs import ConfigError, add_arguments, from_arguments, from_dict


@dataclass
class Inner:
    rate: float = 0.5
    layers: list[int] | None = None


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    limit: int | None = None
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError("steps must be ≥ 0")


def test_from_dict_builds_nested_and_coerces_int_to_float():
    cfg = from_dict(Outer, {"steps": 3, "inner": {"rate": 1, "layers": [1, 2]}, "mode": "b"})
    assert cfg == Outer(steps=3, mode="b", inner=Inner(rate=1.0, layers=[1, 2]))
    assert isinstance(cfg.inner.rate, float)


@pytest.mark.parametrize("data, fragment", [
    ({"stepz": 3}, "config: unknown key(s) 'stepz'"),
    ({"inner": {"rat": 1}}, "config.inner: unknown key(s) 'rat'"),
    ({"steps": "3"}, "config.steps: expected int, got str"),
    ({"steps": True}, "config.steps: expected int, got a boolean"),
    ({"mode": "c"}, "config.mode: 'c' is not one of 'a', 'b'"),
    ({"inner": {"layers": [1, "x"]}}, "config.inner.layers[1]: expected int"),
    ({"inner": 3}, "config.inner: expected a mapping"),
    ({"steps": -1}, "config: steps must be ≥ 0"),
])
def test_from_dict_names_the_bad_key(data, fragment):
    with pytest.raises(ConfigError) as e:
        from_dict(Outer, data)
    assert fragment in str(e.value)


def test_arguments_mirror_scalar_fields():
    p = argparse.ArgumentParser()
    add_arguments(p, Outer)
    assert from_arguments(Outer, p.parse_args([])) == Outer()
    args = p.parse_args(["--steps", "4", "--mode", "b", "--flag", "--limit", "7"])
    assert from_arguments(Outer, args) == Outer(steps=4, mode="b", flag=True, limit=7)
    assert from_arguments(Outer, p.parse_args(["--limit", "none"])).limit is None
    with pytest.raises(SystemExit):
        p.parse_args(["--mode", "c"])
    with pytest.raises(SystemExit):
        p.parse_args(["--inner", "x"])  # nested sections are not options
