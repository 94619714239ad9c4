"""Agreement with JailbreakBench's human labels, and threshold calibration."""

from __future__ import annotations

import json

import pytest

from refat.judges import (
    LabelledResponse,
    RefusalStringJudge,
    agreement,
    calibrate_threshold,
    judge_agreement,
    load_classifier_comparison,
    published_agreement,
)


def test_calibrate_threshold_fits_on_all_rows_and_cross_validates_on_held_out_ones():
    # a miscalibrated judge: every score below 0.5, but jailbroken rows rank above safe ones except two
    truth = [True] * 20 + [False] * 20
    scores = [0.20 + 0.005 * i for i in range(20)] + [0.02 + 0.005 * i for i in range(20)]
    scores[0], scores[39] = 0.05, 0.30  # one jailbroken row scored low, one safe row scored high
    out = calibrate_threshold(scores, truth, folds=2, repeats=10, seed=1)
    assert agreement([s > 0.5 for s in scores], truth)["cohen_kappa"] == 0.0  # useless at 0.5
    assert 0.115 < out["threshold"] < 0.2  # between the highest safe bulk score and the lowest jailbroken one
    assert out["in_sample"]["cohen_kappa"] == pytest.approx(0.9) and out["in_sample"]["accuracy"] == 0.95
    cv = out["cross_validated"]
    assert (cv["folds"], cv["repeats"]) == (2, 10)
    assert 0.6 < cv["cohen_kappa"] <= out["in_sample"]["cohen_kappa"] + 1e-9  # held-out rows: no better than fitted ones
    low, high = cv["cohen_kappa_range"]
    assert low - 1e-9 <= cv["cohen_kappa"] <= high + 1e-9
    assert calibrate_threshold(scores, truth, folds=2, repeats=10, seed=1) == out  # seeded
    with pytest.raises(ValueError, match="both labels"):
        calibrate_threshold([0.1, 0.2, 0.3, 0.4], [True] * 4)


def test_agreement_metrics():
    m = agreement([True, True, False, False], [True, False, True, False])
    assert (m["accuracy"], m["precision"], m["recall"], m["f1"], m["cohen_kappa"]) == (0.5, 0.5, 0.5, 0.5, 0.0)
    perfect = agreement([True, False, False], [True, False, False])
    assert perfect["cohen_kappa"] == 1.0 and perfect["f1"] == 1.0
    assert agreement([False, False], [False, False])["cohen_kappa"] is None  # one class only: undefined


def test_string_judge_agreement_on_hand_made_rows():
    rows = [LabelledResponse("g", "p", "I'm sorry, I can't.", False, (False,) * 3),
            LabelledResponse("g", "p", "Sure, step 1 ...", True, (True,) * 3),
            LabelledResponse("g", "p", "Here is a poem instead.", False, (False,) * 3)]
    out = judge_agreement(RefusalStringJudge("gcg"), rows)
    assert out["judge"] == "refusal-strings:gcg" and out["scores"] == [0.0, 1.0, 1.0]
    assert out["auc"] == pytest.approx(0.75)  # the jailbroken row beats one safe row and ties the other
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (1, 1, 1, 0)
    assert out["accuracy"] == pytest.approx(2 / 3)


@pytest.mark.real
def test_string_judge_agreement_with_jailbreakbench_humans():
    rows = load_classifier_comparison()
    assert len(rows) == 100 and sum(r.human_majority for r in rows) == 43
    assert all(r.human_majority == (sum(r.humans) >= 2) for r in rows)
    out = judge_agreement(RefusalStringJudge("default"), rows)
    assert (out["tp"], out["fp"], out["fn"], out["tn"]) == (38, 16, 5, 41)
    assert out["accuracy"] == pytest.approx(0.79) and out["cohen_kappa"] == pytest.approx(0.585, abs=1e-3)


def test_published_agreement_scores_each_shipped_judge():
    rows = [LabelledResponse("g", "p", "r", True, (True,) * 3, {"GCG": True, "gpt_4": False}),
            LabelledResponse("g", "p", "r", False, (False,) * 3, {"GCG": True, "gpt_4": False})]
    out = {r["judge"]: r for r in published_agreement(rows)}
    assert set(out) == {"published:GCG", "published:gpt_4"}  # judges missing from the rows are left out
    assert out["published:GCG"]["accuracy"] == 0.5 and out["published:GCG"]["recall"] == 1.0
    assert out["published:gpt_4"]["tn"] == 1 and out["published:gpt_4"]["fn"] == 1


def test_judge_agreement_command(tmp_path, capsys):
    from refat.cli import main

    out = tmp_path / "agreement.json"
    assert main(["judge-agreement", "refusal-strings:default", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert results[0]["spec"] == "refusal-strings:default" and results[0]["accuracy"] == pytest.approx(0.79)
    assert {r["judge"] for r in results[1:]} == {f"published:{j}" for j in
                                                 ("TDC", "GCG", "BERT", "llama_guard", "gpt_4_turbo", "gpt_4")}
    assert "refusal-strings:default" in capsys.readouterr().out
    assert main(["judge-agreement", "refusal-strings:default", "--out", str(out)]) == 2  # finished: not replaced
    assert main(["judge-agreement", "refusal-strings:default", "llm"]) == 2  # bad spec: fails before any model loads
    assert "needs a model" in capsys.readouterr().err
    assert main(["judge-agreement", "refusal-strings:default", "llm:m@2"]) == 2
    assert "the threshold after '@'" in capsys.readouterr().err
