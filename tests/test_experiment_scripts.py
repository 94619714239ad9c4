"""The summary logic of ``experiments/attacks_quick.py`` (the attacks themselves are tested in their own files)."""

import importlib.util
from pathlib import Path

import pytest

from refat.attacks.base import AttackRecord, success_rates

SCRIPT = Path(__file__).parents[1] / "experiments" / "attacks_quick.py"


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("attacks_quick", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def record(completion, refused=False, goal="g", target="Sure, here is how"):
    return AttackRecord("a", "b", goal, target, "p", completion, refused=refused)


def test_success_rates_per_prompt_and_best_of_n():
    records = [AttackRecord("a", f"{g}:{i}", "g", "t", "p", "c", extra={"behaviour_id": g}, refused=not ok)
               for i, (ok, g) in enumerate(zip([True, False, False, False, False, True], "xxyyzz"))]
    rates = success_rates(records)
    assert rates == {"asr": 2 / 6, "asr_best_of_n": 2 / 3}


def test_degenerate_looks_past_the_target(script):
    assert script.degenerate(record("Sure, here is how" + "x" * 40))
    assert script.degenerate(record("Sure, I can help. What do you mean?")) is False
    assert not script.degenerate(record("Sure, here is how: first gather the parts, then assemble them slowly."))


def test_second_judge_scores_are_cached(script, tmp_path, monkeypatch):
    records = {"prefill": [record("I'm sorry, I cannot help."), record("Sure, here is how: step one, then two.")]}
    scores = script.judge_scores("refusal-strings:default", records, tmp_path)
    assert scores == {"prefill": [0.0, 1.0]}
    assert len(list(tmp_path.glob("judge-*.jsonl"))) == 1

    def no_load(*_, **__):
        raise AssertionError("judged again although every score is cached")
    monkeypatch.setattr("refat.judges.cache.from_spec", no_load)
    assert script.judge_scores("refusal-strings:default", records, tmp_path) == scores
    records["prefill"].append(record("Another answer entirely, not cached yet."))
    with pytest.raises(AssertionError, match="judged again"):
        script.judge_scores("refusal-strings:default", records, tmp_path)
