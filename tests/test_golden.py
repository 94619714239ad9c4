"""Golden outputs (tests/golden/*.json, written by tests/golden/make_golden.py) still come out of today's code:
GCG, AutoDAN, the embedding attack, the CAT/LAT inner attack and training steps, and the analysis."""

from __future__ import annotations

import json
import math

import pytest
from golden.make_golden import CASES, path


def assert_close(got, want, where: str = "") -> None:
    """Floats within rel 1e-5 / abs 1e-6; ints, strings, bools and the structure exactly."""
    if isinstance(want, float) or isinstance(got, float):
        assert isinstance(got, (int, float)) and math.isclose(got, want, rel_tol=1e-5, abs_tol=1e-6), \
            f"{where}: {got!r} != {want!r}"
    elif isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), f"{where}: keys {list(got)} != {list(want)}"
        for k in want:
            assert_close(got[k], want[k], f"{where}.{k}")
    elif isinstance(want, list):
        assert isinstance(got, (list, tuple)) and len(got) == len(want), f"{where}: {got!r} != {want!r}"
        for i, (g, w) in enumerate(zip(got, want)):
            assert_close(g, w, f"{where}[{i}]")
    else:
        assert got == want, f"{where}: {got!r} != {want!r}"


@pytest.mark.parametrize("name", list(CASES))
def test_golden(name):
    want = json.loads(path(name).read_text(encoding="utf-8"))
    got = json.loads(json.dumps(CASES[name]()))  # the same JSON types as the stored file (tuples -> lists, int keys)
    assert_close(got, want, name)
