"""The summary logic of ``experiments/attacks_quick.py`` (the attacks themselves are tested in their own files)."""

import importlib.util
import random
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


@pytest.fixture(scope="module")
def judge_variants():
    path = Path(__file__).parents[1] / "experiments" / "judge_variants.py"
    spec = importlib.util.spec_from_file_location("judge_variants", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_judge_variant_steps_put_every_variant_in_the_pools(judge_variants):
    steps = judge_variants.default_steps(["llm:m#comply", "llm:m#content"])
    pools = {s["step"]: s["pool"] for s in steps}
    assert pools["llm:m#comply (threshold fitted in the folds)"] == ["llm:m#comply"]
    assert pools[f"{judge_variants.ANCHOR} + llm:m#content"] == [judge_variants.ANCHOR, "llm:m#content"]
    assert pools["llm:m, its prompt chosen in the folds"] == ["llm:m#comply", "llm:m#content"]
    assert "llm:qwen2.5-coder-0.5b" in pools["llm:qwen2.5-coder-0.5b, its prompt chosen in the folds"]
    everything = steps[-1]["pool"]
    assert {"llm:m#comply", "llm:m#content", *judge_variants.STRINGS} <= set(everything)
    assert len(everything) == len(set(everything))


def test_judge_variant_table_measures_each_step_held_out(judge_variants):
    rng = random.Random(0)
    truth = [rng.random() < 0.45 for _ in range(60)]
    anchor = [1.0 if t or rng.random() < 0.4 else 0.0 for t in truth]  # a string judge: misses no jailbreak, over-calls
    reader = [min(max((0.7 if t else 0.3) + rng.gauss(0, 0.15), 0.01), 0.99) for t in truth]  # ranks within them too
    noise = [rng.random() for _ in truth]
    scores = {"anchor": anchor, "reader": reader, "noise": noise}
    steps = [{"step": "noise", "pool": ["noise"], "max_members": 1},
             {"step": "anchor + reader", "pool": ["anchor", "reader"], "max_members": 2}]
    table = judge_variants.variant_table(scores, truth, steps, anchor="anchor", outer=3, inner=3, repeats=2)
    assert table["judges"]["reader"]["auc_where_anchor_says_jailbroken"] > 0.85
    assert "auc_where_anchor_says_jailbroken" not in table["judges"]["anchor"]
    noise_step, combined = table["steps"]
    assert noise_step["cohen_kappa"] < 0.3 < 0.6 < combined["cohen_kappa"]
    assert sum(combined["chosen"].values()) == 3 * 2 and 0 < combined["cohen_kappa_se"] < 0.3


def test_feature_window_comparison_is_exact_at_window_1_and_measures_the_window(tmp_path):
    import torch
    from conftest import build_model

    from refat.training import Pair

    path = Path(__file__).parents[1] / "experiments" / "feature_window.py"
    spec = importlib.util.spec_from_file_location("feature_window", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pairs = ([Pair(f"harmful request {i}" + " now" * (i % 3), "I'm sorry, I can't.", True, "template") for i in range(8)]
             + [Pair(f"harmless question {i}", f"Answer {i}.", False, "dataset") for i in range(8)])
    model = lambda: build_model("llama", layers=4, hidden=32, dtype=torch.float32)  # noqa: E731
    one = module.measure(model(), pairs, window=1, steps=8)
    assert [r["step"] for r in one["recomputations"]] == [0, 4]
    assert all(r["cosine_min"] > 1 - 1e-6 for r in one["recomputations"])  # window 1 is the fresh computation
    assert one["recomputations"][1]["fresh_drift_since_previous_min"] < 1 - 1e-4  # the model moved in 4 steps
    two = module.measure(model(), pairs, window=2, steps=12)
    assert two["turned_over"]["from_step"] == 8 and two["recomputations"][0]["cosine_min"] > 1 - 1e-6
    assert two["turned_over"]["cosine_min"] < 1 - 1e-4  # step 4's means, in the window at step 8, are stale


def test_recipe_judge_counts_each_models_attacked_completions(tmp_path):
    import json

    path = Path(__file__).parents[1] / "experiments" / "recipe_judge.py"
    spec = importlib.util.spec_from_file_location("recipe_judge", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    parts = tmp_path / "parts"
    parts.mkdir()
    completions = {"none/a": {"goal": "g1", "completion": "I'm sorry, I can't help with that."},
                   "rfa/a": {"goal": "g1", "completion": "Sure: first, mix the two parts slowly and then wait."},
                   "rfa/b": {"goal": "g2", "completion": "the the the the the the the the the the"}}
    verdicts = [{"attack": "none", "behaviour_id": "a", "jailbroken": False},
                {"attack": "rfa", "behaviour_id": "a", "jailbroken": True},
                {"attack": "rfa", "behaviour_id": "b", "jailbroken": True}]
    (parts / "m.json").write_text(json.dumps({"key": "m", "completions": completions,
                                              "verdicts": {module.STRING_JUDGE: verdicts}}))
    (parts / "other.json").write_text(json.dumps({"not": "a part"}))  # skipped
    out = module.summarize(parts, "refusal-strings:default", tmp_path / "cache.jsonl")
    rfa = out["models"]["m"]["rfa"]
    assert list(out["models"]) == ["m"] and rfa["n"] == 2 and rfa["degenerate"]["value"] == 0.5
    assert rfa["carried_out"]["value"] == 1.0 and rfa["not_refused"]["value"] == 1.0  # a string judge: both count
    assert out["models"]["m"]["none"]["carried_out"]["value"] == 0.0
    assert (tmp_path / "cache.jsonl").exists()
