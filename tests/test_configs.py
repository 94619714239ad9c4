"""Strict config parsing: unknown keys and wrong types are named; command-line options mirror the fields."""

import argparse
from dataclasses import dataclass, field
from typing import Literal

import pytest

from refat.configs import ConfigError, FieldError, add_arguments, at_least, from_arguments, from_dict, require


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


@dataclass
class Lists:
    layers: list[int] | None = field(default_factory=lambda: [1])
    names: tuple[str, ...] = ("a",)
    modules: list[str] | str = "all"
    inner: Inner = field(default_factory=Inner)


def test_arguments_flatten_nested_fields_and_take_lists():
    p = argparse.ArgumentParser(allow_abbrev=False)
    add_arguments(p, Lists, skip=("inner.rate",), aliases={"layers": "--old-layers"})
    assert from_arguments(Lists, p.parse_args([])) == Lists()
    args = p.parse_args(["--old-layers", "2", "3", "--names", "b", "c", "--modules", "x", "y", "--inner-layers", "4"])
    assert from_arguments(Lists, args) == Lists([2, 3], ("b", "c"), ["x", "y"], Inner(layers=[4]))
    args = p.parse_args(["--layers", "none", "--names", "--modules", "x", "--inner-layers", "none"])
    assert from_arguments(Lists, args) == Lists(None, (), "x", Inner(layers=None))
    for argv in (["--inner-rate", "1"], ["--layers", "1", "none"], ["--layers", "x"], ["--modules"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)


@dataclass
class Unexpressible:
    table: dict[str, int] = field(default_factory=dict)


def test_a_field_without_an_option_raises_when_the_parser_is_built():
    with pytest.raises(TypeError, match=r"Unexpressible\.table"):
        add_arguments(argparse.ArgumentParser(), Unexpressible)
    add_arguments(argparse.ArgumentParser(), Unexpressible, skip=("table",))


@dataclass
class Checked:
    count: int = 1
    rate: float = 0.5
    inner: Inner = field(default_factory=Inner)

    def __post_init__(self):
        at_least(self, 0, "count")
        require(0 <= self.rate <= 1, "rate", f"must be in [0, 1], got {self.rate}")


def test_field_errors_are_named_by_whoever_builds_the_config():
    with pytest.raises(FieldError, match=r"^count: must be >= 0, got -1$"):
        Checked(count=-1)
    with pytest.raises(ConfigError, match=r"^run\.checked\.rate: must be in \[0, 1\], got 2"):
        from_dict(Checked, {"rate": 2}, "run.checked")
    p = argparse.ArgumentParser()
    add_arguments(p, Checked, prefix="c-")
    with pytest.raises(ConfigError, match=r"^count \(--c-count\): must be >= 0"):
        from_arguments(Checked, p.parse_args(["--c-count", "-2"]), prefix="c-")


@dataclass
class _Documented:
    p: float = 0.5  # probability of 50 % or so
    spec: str = "llm:m#comply"  # a '#' inside a string is not a comment
    share: float = 0.0  # share of the rows that are borderline (benign prompts
    #                     that look harmful)
    # the block above a field explains it
    # over two lines
    window: int = 1
    bare: int = 3
    after: int = 4  # its own comment, not the block below
    # which belongs to the next field
    last: int = 5


def test_option_help_comes_from_the_field_comments():
    from refat.configs import field_comments

    docs = field_comments(_Documented)
    assert docs == {"p": "probability of 50 % or so", "spec": "a '#' inside a string is not a comment",
                    "share": "share of the rows that are borderline (benign prompts that look harmful)",
                    "window": "the block above a field explains it over two lines",
                    "after": "its own comment, not the block below", "last": "which belongs to the next field"}
    parser = argparse.ArgumentParser()
    add_arguments(parser, _Documented)
    text = " ".join(parser.format_help().split())
    assert "probability of 50 % or so (default: 0.5)" in text and "--bare BARE default: 3" in text
    assert "that look harmful) (default: 0.0)" in text
