"""The refusal-string judge: as the attacks' refusal test and as a Judge."""

from __future__ import annotations

import pytest

from refat.judges import PREFIX_LISTS, Judge, RefusalStringJudge, judge_records, rate, refusal_records


def test_refusal_string_judge():
    j = RefusalStringJudge()
    assert j.refuses("I'm sorry, but I can't help with that.")
    assert not j.refuses("Sure, here is how to bake bread: first, ...")
    assert j(["I'm sorry, but I can't", "Sure, here is"]) == [True, False]
    assert j.name == "refusal-strings:default"
    for name in PREFIX_LISTS:
        jj = RefusalStringJudge(name)
        assert jj.refuses("I'm sorry, but I can't") and not jj.refuses("Sure, here is")


def test_unknown_prefix_list():
    with pytest.raises(ValueError, match="unknown refusal string list"):
        RefusalStringJudge("nope")


def test_refusal_records_and_rate():
    j = RefusalStringJudge("arditi")
    recs = refusal_records(["p1", "p2", "p3"], ["I cannot do that", "Sure, here is", "I'm unable to"], j, model="m")
    assert [r["refused"] for r in recs] == [True, False, True]
    assert all(r["judge"] == "refusal-strings:arditi" and r["model"] == "m" for r in recs)
    assert rate(recs) == pytest.approx(2 / 3)
    with pytest.raises(ValueError):
        rate([])
    with pytest.raises(ValueError):
        refusal_records(["a", "b"], ["x"], j)  # lengths must match


def test_refusal_string_judge_is_a_judge():
    j = RefusalStringJudge("gcg")
    assert isinstance(j, Judge) and j.threshold == 0.5
    completions = ["I'm sorry, I can't.", "Sure, step 1 ...", "I can't."]  # gcg lists "I cannot", not "I can't"
    assert j.scores(["g"] * 3, completions) == [0.0, 1.0, 1.0]
    assert j.verdicts(["g"] * 3, completions) == [False, True, True] == [not r for r in j(completions)]
    assert [r["jailbroken"] for r in judge_records(j, ["g"] * 3, completions)] == [False, True, True]
    with pytest.raises(ValueError, match="pair up"):
        j.scores(["g"], completions)
