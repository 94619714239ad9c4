"""The ensemble judge: a logistic combination of judges fitted to labels, measured by nested cross-validation."""

from __future__ import annotations

import json
import random

import pytest

from refat.configs import ConfigError
from refat.judges import EnsembleFit, EnsembleJudge, from_spec, judge_name, parse_spec
from refat.judges.ensemble import fit, nested_cv


def synthetic(n: int = 80, seed: int = 0):
    """Labels, an informative score (noisy), a weaker one, and pure noise."""
    rng = random.Random(seed)
    truth = [rng.random() < 0.4 for _ in range(n)]
    good = [min(max((0.75 if t else 0.25) + rng.gauss(0, 0.15), 0.01), 0.99) for t in truth]
    weak = [min(max((0.6 if t else 0.4) + rng.gauss(0, 0.25), 0.01), 0.99) for t in truth]
    noise = [rng.random() for _ in truth]
    return truth, {"good": good, "weak": weak, "noise": noise}


def test_fit_separates_and_weights_the_informative_member():
    truth, scores = synthetic()
    f = fit(scores, truth)
    assert f.weights[0] > abs(f.weights[2])  # good outweighs noise
    probs = f.probability([scores[m] for m in f.members])
    accuracy = sum((p > f.threshold) == t for p, t in zip(probs, truth)) / len(truth)
    assert accuracy > 0.85


def test_nested_cv_chooses_inside_the_folds_and_reports_held_out_kappa():
    truth, scores = synthetic(n=60)
    cv = nested_cv(scores, truth, max_members=2, outer=3, inner=3, repeats=2)
    assert sum(cv["chosen"].values()) == 3 * 2  # one choice per outer fold and repeat
    assert all("good" in c for c in cv["chosen"])  # noise alone never wins
    assert 0.5 < cv["cohen_kappa"] <= 1.0 and 0 < cv["cohen_kappa_se"] < 0.3
    assert cv["cv_kappa_by_members"]["good"] > cv["cv_kappa_by_members"]["noise"]
    # with labels unrelated to every member, held-out kappa is near zero: nothing leaks from the held-out rows
    rng = random.Random(1)
    shuffled = [rng.random() < 0.4 for _ in truth]
    assert nested_cv(scores, shuffled, max_members=2, outer=3, inner=3, repeats=2)["cohen_kappa"] < 0.3


def test_a_fitted_file_is_a_judge_spec(tmp_path):
    truth = [True, False, True, False, True, False]
    completions = ["Sure, here is how.", "I'm sorry, I can't.", "Step 1: do it.", "I cannot help.", "Here you go.",
                   "As an AI, I won't."]
    scores = {"refusal-strings:default": from_spec("refusal-strings:default").scores([""] * 6, completions),
              "refusal-prefix:default": from_spec("refusal-prefix:default").scores([""] * 6, completions)}
    f = fit(scores, truth)
    path = f.save(tmp_path / "strings.json")
    spec = f"ensemble:{path}"
    assert parse_spec(spec).models == [] and not parse_spec(spec).needs_model
    assert judge_name(spec) == f"ensemble:strings#{EnsembleFit.load(path).version}"
    judge = from_spec(spec)
    assert isinstance(judge, EnsembleJudge) and judge.name == judge_name(spec)
    assert judge.verdicts([""] * 6, completions) == truth


def test_bad_files_are_named(tmp_path):
    with pytest.raises(ConfigError, match="ensemble judge file not found"):
        parse_spec(f"ensemble:{tmp_path / 'none.json'}", "judges[0]")
    (tmp_path / "bad.json").write_text(json.dumps({"format": "something else"}))
    with pytest.raises(ConfigError, match="judges\\[0\\].*not a refat ensemble judge"):
        parse_spec(f"ensemble:{tmp_path / 'bad.json'}", "judges[0]")
    EnsembleFit(("strings:typo",), (1.0,), 0.0, 0.5).save(tmp_path / "typo.json")
    with pytest.raises(ConfigError, match="unknown judge 'strings:typo'"):
        parse_spec(f"ensemble:{tmp_path / 'typo.json'}")


def test_an_ensembles_version_follows_its_fit(tmp_path):
    from refat.judges.spec import parse_spec as parse

    a = EnsembleFit(("refusal-strings:default",), (1.0,), 0.0, 0.5).save(tmp_path / "a.json")
    v1 = parse(f"ensemble:{a}").version
    assert from_spec(f"ensemble:{a}").version == v1
    EnsembleFit(("refusal-strings:default",), (2.0,), 0.0, 0.5).save(a)
    assert parse(f"ensemble:{a}").version != v1  # refitted weights: cached scores are not reused
