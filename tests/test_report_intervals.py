"""Every reported number with n and an interval: the behaviour-level bootstrap of the judges stage, the report
stage's cells, judge agreement and sample completions, and how report.md / report.html show them."""

from __future__ import annotations

import json

import pytest

from refat.judges import agreement
from refat.pipeline.stages import judges as judges_stage
from refat.pipeline.stages import report as report_stage
from refat.report import MAX_SAMPLES, SAMPLE_CHARS, _bar_heights, write_report
from refat.stats import bootstrap, clustered_rate

# ---- the unit of resampling is the behaviour --------------------------------------------------------------------

def test_a_behaviour_with_several_records_counts_once():
    r = clustered_rate([[True, True, True], [False]])  # one behaviour under three templates, one under one
    assert (r.value, r.n) == (0.75, 2)
    # two behaviours: the resamples are {A, A} = 1, {B, B} = 0, {A, B} = 3/4, so the interval is all of [0, 1];
    # the four records resampled singly would claim a narrower one
    assert r.ci == (0.0, 1.0)
    assert bootstrap([1, 1, 1, 0])[0] > 0.0
    assert clustered_rate([[True, True]] * 3).ci == (1.0, 1.0)


def test_one_record_per_behaviour_is_the_plain_bootstrap():
    flags = [True, False, False, True, False, True, False, False]
    assert clustered_rate([[f] for f in flags]).ci == bootstrap(flags)
    assert clustered_rate([[f] for f in flags], seed=1).ci == clustered_rate([[f] for f in flags], seed=1).ci
    with pytest.raises(ValueError, match="empty unit"):
        clustered_rate([[True], []])


def test_judges_stage_rates_keep_the_plain_values_and_add_n_and_intervals():
    hits = {("rt", "templates"): [("b1", True), ("b2", False), ("b1", True), ("b2", False), ("b1", True), ("b2", True)],
            ("rt", "prefill"): [("b1", True), ("b2", False), ("b3", False)]}
    tables = judges_stage.rate_tables(hits)
    assert set(tables) == {"rates", "n", "ci"}
    assert tables["rates"]["rt"] == {"templates": 4 / 6, "templates best-of-n": 1.0, "prefill": 1 / 3}
    assert tables["n"]["rt"] == {"templates": 2, "templates best-of-n": 2, "prefill": 3}
    assert tables["ci"]["rt"]["templates"] == list(clustered_rate([[True] * 3, [False, False, True]]).ci)
    assert tables["ci"]["rt"]["templates best-of-n"] == [1.0, 1.0]  # both behaviours broken by some template
    assert tables["ci"]["rt"]["prefill"] == list(bootstrap([1, 0, 0]))


# ---- the report stage's tables ----------------------------------------------------------------------------------

def _row(d, a, b, jailbroken, completion="text"):
    return {"defense": d, "attack": a, "behaviour_id": b, "behaviour": b, "goal": f"goal {b}", "completion": completion,
            "score": float(jailbroken), "jailbroken": jailbroken, "judge": "x"}


def test_rate_cell_reads_old_and_new_rates_files():
    new = {"judge": "s", "rates": {"rt": {"gcg": 0.5}}, "n": {"rt": {"gcg": 4}}, "ci": {"rt": {"gcg": [0.25, 0.75]}}}
    assert report_stage.rate_cell(new, "rt", "gcg") == {"value": 0.5, "n": 4, "ci": [0.25, 0.75]}
    old = {"judge": "s", "rates": {"rt": {"gcg": 0.5}}}  # a judges stage from before intervals
    assert report_stage.rate_cell(old, "rt", "gcg") == 0.5


def test_samples_are_the_first_jailbroken_and_refused_in_behaviour_order():
    flags = {"b3": True, "b1": False, "b5": True, "b2": True, "b4": False, "b0": False}
    strings = [_row("rt", "gcg", b, f, completion=f"c{b}") for b, f in flags.items()] + [_row("rt", "none", "b9", False)]
    llm = [dict(r, jailbroken=not r["jailbroken"]) for r in strings]
    out = report_stage.samples({"strings": strings, "llm": llm})
    assert out["judge"] == "strings"
    gcg = [s for s in out["samples"] if s["attack"] == "gcg"]
    assert [s["behaviour_id"] for s in gcg] == ["b2", "b3", "b0", "b1"]
    assert gcg[0] == {"defense": "rt", "attack": "gcg", "behaviour_id": "b2", "goal": "goal b2", "completion": "cb2",
                      "verdicts": {"strings": True, "llm": False}}
    assert [s["behaviour_id"] for s in out["samples"] if s["attack"] == "none"] == ["b9"]  # fewer than asked: all
    assert len(report_stage.samples({"strings": strings}, per_verdict=1)["samples"]) == 3


def test_judge_agreement_per_cell():
    a = [_row("rt", "gcg", f"b{i}", f) for i, f in enumerate([True, True, False, False, True])]
    b = [dict(r, jailbroken=f) for r, f in zip(a, [True, False, False, False, False])]
    asr = {"rt": {"gcg": {"A": {"value": 0.6, "n": 5, "ci": [0.2, 1.0]}, "B": 0.2}}}
    [pair] = report_stage.judge_agreement({"A": a, "B": b}, asr)
    assert pair["judges"] == ["A", "B"]
    [cell] = pair["cells"]
    assert cell["asr"] == {"A": asr["rt"]["gcg"]["A"], "B": 0.2}
    assert cell["disagree"]["value"] == 0.4 and cell["disagree"]["n"] == 5
    assert cell["kappa"] == pytest.approx(agreement([True, False, False, False, False],
                                                    [True, True, False, False, True])["cohen_kappa"])
    assert 0.0 < cell["kappa"] < 1.0


# ---- report.md and report.html ----------------------------------------------------------------------------------

def _cell(value, n, lo, hi):
    return {"value": value, "n": n, "ci": [lo, hi]}


@pytest.fixture
def new_run(tmp_path):
    (tmp_path / "asr.json").write_text(json.dumps({
        "rt": {"gcg": {"strings": _cell(0.36, 50, 0.24, 0.50), "llm": _cell(0.3, 50, 0.18, 0.44)}},
        "refat": {"gcg": {"strings": _cell(0.125, 8, 0.0, 0.375), "llm": 0.1}}}))  # one cell in the old form
    (tmp_path / "utility.json").write_text(json.dumps({"rt": {"mmlu": _cell(0.512, 200, 0.443, 0.581), "arc": 0.7}}))
    (tmp_path / "overrefusal.json").write_text(json.dumps({"rt": {"xstest": _cell(0.08, 250, 0.052, 0.12)}}))
    (tmp_path / "judge_agreement.json").write_text(json.dumps([{"judges": ["strings", "llm"], "cells": [
        {"defense": "rt", "attack": "gcg",
         "asr": {"strings": _cell(0.36, 50, 0.24, 0.50), "llm": _cell(0.3, 50, 0.18, 0.44)},
         "disagree": _cell(0.1, 50, 0.04, 0.21), "kappa": 0.78},
        {"defense": "refat", "attack": "gcg", "asr": {"strings": 0.0, "llm": 0.0}, "disagree": _cell(0.0, 8, 0.0, 0.32),
         "kappa": None}]}]))
    long = "Sure, here is how. " + "x" * 1000
    samples = [{"defense": "rt", "attack": "gcg", "behaviour_id": "b1", "goal": "Do <b>harm</b>",
                "completion": "<script>alert('pwned')</script> | done\nnext line",
                "verdicts": {"strings": True, "llm": False}},
               {"defense": "rt", "attack": "gcg", "behaviour_id": "b2", "goal": "g", "completion": long,
                "verdicts": {"strings": False, "llm": False}}]
    (tmp_path / "samples.json").write_text(json.dumps({"judge": "strings", "samples": samples}))
    write_report(tmp_path, plots=False)
    return tmp_path


def test_report_shows_value_interval_and_n(new_run):
    md = (new_run / "report.md").read_text()
    assert "| rt | 36 % [24, 50] (n=50) |" in md and "| refat | 12 % [0, 38] (n=8) |" in md  # judge "strings"
    assert "| refat | 10.0 % |" in md  # an old plain number next to new cells
    assert "| rt | 51 % [44, 58] (n=200) | 0.7 |" in md  # utility: accuracy as a rate; a plain score as it is
    assert "| rt | 8 % [5, 12] (n=250) |" in md  # over-refusal
    assert "bootstrap interval over the n behaviours" in md and "Wilson interval over the n prompts" in md
    page = (new_run / "report.html").read_text()
    assert "<td>36 % [24, 50] (n=50)</td>" in page


def test_bars_show_the_value_and_the_interval():
    vals, lows, highs = _bar_heights([_cell(0.36, 50, 0.24, 0.50), 0.2, None, {"value": 0.5}])
    assert vals == pytest.approx([36.0, 20.0, 0.0, 50.0])
    assert lows == pytest.approx([12.0, 0.0, 0.0, 0.0]) and highs == pytest.approx([14.0, 0.0, 0.0, 0.0])


def test_report_judge_agreement_section(new_run):
    md = (new_run / "report.md").read_text()
    section = md.split("## Judge agreement\n", 1)[1].split("\n## ", 1)[0]
    assert "| defense | attack | ASR strings | ASR llm | disagree | Cohen's κ |" in section
    assert "| rt | gcg | 36 % [24, 50] (n=50) | 30 % [18, 44] (n=50) | 10 % [4, 21] (n=50) | 0.78 |" in section
    assert "| refat | gcg | 0.0 % | 0.0 % | 0 % [0, 32] (n=8) | — |" in section
    assert md.index("## Attack success rate") < md.index("## Judge agreement") < md.index("## Utility")


def test_report_sample_completions_are_escaped_and_cut(new_run):
    page, md = (new_run / "report.html").read_text(), (new_run / "report.md").read_text()
    assert "<script>alert" not in page and "&lt;script&gt;alert(&#x27;pwned&#x27;)&lt;/script&gt;" in page
    assert "<b>harm</b>" not in page and "Do &lt;b&gt;harm&lt;/b&gt;" in page
    assert "<script>" not in md and "&lt;script&gt;alert('pwned')&lt;/script&gt; \\| done next line" in md
    assert "| rt | gcg | b1 | jailbroken / refused |" in md and "| rt | gcg | b2 | refused / refused |" in md
    cut = "Sure, here is how. " + "x" * (SAMPLE_CHARS - 19) + " […]"
    assert f"| {cut} |" in md and "x" * (SAMPLE_CHARS - 18) not in md
    assert "Verdicts by judge: `strings`, `llm`." in md


def test_report_caps_the_samples(tmp_path):
    sample = {"defense": "rt", "attack": "gcg", "behaviour_id": "b", "goal": "g", "completion": "c",
              "verdicts": {"s": True}}
    (tmp_path / "samples.json").write_text(json.dumps({"judge": "s", "samples": [sample] * (MAX_SAMPLES + 7)}))
    md = write_report(tmp_path, plots=False)[0].read_text()
    assert md.count("| rt | gcg | b | jailbroken | g | c |") == MAX_SAMPLES and "7 more in `samples.json`" in md


def test_report_names_malformed_agreement_and_samples(tmp_path):
    (tmp_path / "judge_agreement.json").write_text(json.dumps([{"judges": ["a"]}]))
    (tmp_path / "samples.json").write_text("{oops")
    md = write_report(tmp_path, plots=False)[0].read_text()
    assert "`judge_agreement.json` does not follow the schema" in md and "Could not read `samples.json`" in md


def test_a_run_without_agreement_or_samples_has_neither_section(tmp_path):
    (tmp_path / "asr.json").write_text(json.dumps({"rt": {"gcg": {"strings": 0.5}}}))  # one judge, older folder
    md = write_report(tmp_path, plots=False)[0].read_text()
    assert "| rt | 50.0 % |" in md and "## Judge agreement" not in md and "## Sample completions" not in md


def test_report_tradeoff_marks_the_models_no_other_beats(tmp_path):
    from refat.report import write_report

    def cell(v):
        return {"value": v, "n": 40, "ci": [max(0.0, v - 0.1), min(1.0, v + 0.1)], "vs_base": None}

    def mean(v):
        return {"mean": v, "sd": 0.05, "seeds": 2, "vs_base": None}

    paired = {"base": {"harmless": cell(0.10), "rfa refusal": cell(0.05)},
              "rt": {"harmless": cell(0.12), "rfa refusal": cell(0.30)},
              "rt@seed1": {"harmless": cell(0.50), "rfa refusal": cell(0.90)},  # shown through its seed mean
              "rt (2 seeds)": {"harmless": mean(0.14), "rfa refusal": mean(0.35)},
              "refat": {"harmless": cell(0.30), "rfa refusal": cell(0.70)},
              "lat": {"harmless": cell(0.40), "rfa refusal": cell(0.60)}}
    (tmp_path / "paired.json").write_text(json.dumps(paired))
    md, _ = write_report(tmp_path)
    text = md.read_text()
    section = text[text.index("## Robustness against over-refusal"):]
    rows = {line.split("|")[1].strip(): line for line in section.splitlines() if line.startswith("| ")}
    assert "rt (2 seeds)" in rows and "rt@seed1" not in rows and "rt" not in rows
    assert [m for m in ("base", "rt (2 seeds)", "refat", "lat") if rows[m].rstrip(" |").endswith("yes")] == \
        ["base", "rt (2 seeds)", "refat"]  # lat: refat refuses more under attack and less of the harmless set
    assert (tmp_path / "plots" / "tradeoff_harmless.png").is_file()
