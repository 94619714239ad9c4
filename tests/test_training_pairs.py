"""Training pairs: strict refusal targets, harmless answers from the model, borderline pairs from the model's
own non-refusing answers, and no evaluation prompt in any pair (val/test splits, the over-refusal eval half).

The model's completions are scripted (``generate`` is replaced), so each rule is tested on known text; the
tiny model only supplies the tokenizer and chat template.
"""

from __future__ import annotations

import json
from dataclasses import asdict

import pytest
from conftest import build_model, write_prompts

from refat.cli import build_parser
from refat.configs import ConfigError, from_arguments, from_dict
from refat.data import DataConfig, Example, prompt_key, prompt_sets
from refat.evals.overrefusal import split_halves
from refat.training import Pair, PairsConfig, build_pairs, training_pairs
from refat.training import data as pairs_mod
from refat.training.data import NATURAL_REFUSALS, encode, refuses_outright


@pytest.fixture(scope="module")
def model():
    return build_model("llama", layers=2, hidden=32)


def script(monkeypatch, answers: dict[str, str], default: str = "Here is a helpful answer.") -> list[list[str]]:
    """Make ``generate`` answer each prompt from ``answers`` (else ``default``); returns the prompts asked, per call."""
    calls = []

    def fake(model, prompts, **kw):
        calls.append(list(prompts))
        return [answers.get(p, default) for p in prompts]
    monkeypatch.setattr(pairs_mod, "generate", fake)
    return calls


# --- strict refusal targets -----------------------------------------------------------------------------------

@pytest.mark.parametrize("completion, outright", [
    ("I'm sorry, but I can't help with that. However, here is how to do it: first, get", False),
    ("As an AI, I can explain: step 1 is to acquire", False),
    ("I can't help with that. If you're struggling, please reach out to a crisis line.", True),
    ("I cannot help with that.\n1. Buy a pipe", False),
    ("I won't help with that. That said, the general idea is", False),
    ("I'm sorry, I can't do that. Make sure you stay safe.", True),  # "make sure" is not "Sure,"
    ("I must decline; it was banned in 2021. Please ask me something else.", True),  # "2021. " is no list
    ("Sure, here is a tutorial on how to", False),  # complies from the start
    ("Making a bomb requires... I cannot stress enough how dangerous", False),  # refuses only later
])
def test_refusal_target_must_refuse_from_the_start_and_not_go_on(completion, outright):
    assert refuses_outright(completion) is outright


def test_strict_rule_replaces_a_complying_own_completion_by_a_natural_refusal(model, monkeypatch):
    harmful = [Example("Build a weapon"), Example("Write malware"), Example("Steal a car")]
    script(monkeypatch, {"Build a weapon": "As an AI, I can explain: step 1 is to buy parts.",
                         "Write malware": "I can't help with that. If you're struggling, please reach out to someone.",
                         "Steal a car": "Sure, here is how."})
    harmless = [Example("Bake bread", target="Mix flour and water.")]
    strict = {p.prompt: p for p in build_pairs(model, harmful, harmless) if p.harmful}
    assert strict["Build a weapon"].source == "template" and strict["Build a weapon"].response in NATURAL_REFUSALS
    assert strict["Write malware"].source == "model" and strict["Write malware"].response.startswith("I can't help")
    assert strict["Steal a car"].source == "template"
    assert all(p.kind == "harmful" and p.affirmative for p in strict.values())
    loose = {p.prompt: p for p in build_pairs(model, harmful, harmless, strict_refusals=False) if p.harmful}
    assert loose["Build a weapon"].source == "model"  # the earlier rule: "As an AI" anywhere made it a refusal


# --- harmless answers from the model ---------------------------------------------------------------------------

def test_harmless_model_targets_keep_non_refusing_answers_and_fall_back(model, monkeypatch):
    harmless = [Example("Bake bread", target="Mix flour and water."),
                Example("Kill a process", target="Use kill -9."),
                Example("Name a color")]  # no dataset answer
    calls = script(monkeypatch, {"Bake bread": "Knead the dough, then bake it at 220 C.",
                                 "Kill a process": "I'm sorry, but I can't help with killing.",
                                 "Name a color": "I cannot do that."})
    pairs = build_pairs(model, [Example("Harm")], harmless, harmless_targets="model")
    answers = {p.prompt: p for p in pairs if not p.harmful}
    assert answers["Bake bread"].source == "model"
    assert answers["Bake bread"].response == "Knead the dough, then bake it at 220 C."
    assert (answers["Kill a process"].source, answers["Kill a process"].response) == ("dataset", "Use kill -9.")
    assert "Name a color" not in answers  # refused and no dataset answer: dropped
    assert all(p.kind == "harmless" for p in answers.values())
    assert calls[1] == ["Bake bread", "Kill a process", "Name a color"]

    calls = script(monkeypatch, {})
    pairs = build_pairs(model, [Example("Harm")], harmless[:2])  # "dataset": the model is asked nothing
    assert [p.source for p in pairs if not p.harmful] == ["dataset", "dataset"] and len(calls) == 1


def test_a_cut_answer_is_trained_without_an_end_of_turn(model, monkeypatch):
    long = "word " * 40  # one token per byte: 200 tokens, over the 64-token limit
    script(monkeypatch, {"Short": "Done.", "Long": long})
    pairs = {p.prompt: p for p in build_pairs(model, [Example("Harm")], [Example("Short"), Example("Long")],
                                              harmless_targets="model")}
    assert pairs["Short"].complete and not pairs["Long"].complete
    ended, _ = encode(model, "Short", "Done.", 512)
    cut, n_prompt = encode(model, "Short", "Done.", 512, end=False)
    assert ended[:len(cut)] == cut and len(ended) > len(cut)
    assert model.tokenizer.decode(cut[n_prompt:]) == "Done."
    assert model.tokenizer.eos_token_id not in cut[n_prompt:]


# --- borderline pairs ------------------------------------------------------------------------------------------

def test_borderline_pairs_are_the_models_own_non_refusing_answers(model, monkeypatch):
    candidates = [Example(f"How do I kill process {i}?") for i in range(6)]
    script(monkeypatch, {"How do I kill process 0?": "I'm sorry, I can't help with that.",
                         "How do I kill process 2?": "As an AI, I cannot give advice on killing.",
                         "How do I kill process 3?": "Run `kill 3`. I cannot stress enough: save your work first."})
    pairs = build_pairs(model, [Example("Harm")], [Example("Bake bread", target="Mix.")], borderline=candidates,
                        n_borderline=3, exclude=["how do I KILL process 1?"])
    border = [p for p in pairs if p.kind == "borderline"]
    assert [p.prompt for p in border] == ["How do I kill process 3?", "How do I kill process 4?",
                                          "How do I kill process 5?"]  # 0 and 2 refused, 1 is an evaluation prompt
    assert border[0].response.startswith("Run `kill 3`")  # a hedge later in the answer is no refusal
    assert all(not p.harmful and p.source == "model" for p in border)
    with pytest.raises(ValueError, match="asked for 5 borderline pairs, but the model answered only 3"):
        build_pairs(model, [Example("Harm")], [], borderline=candidates, n_borderline=5, exclude=[candidates[1].prompt])


def test_pair_kind_follows_harmful_and_old_records_still_load():
    assert Pair("p", "r", True, "template").kind == "harmful" and Pair("p", "r", False, "dataset").kind == "harmless"
    border = Pair("p", "r", False, "model", kind="borderline")
    assert Pair(**json.loads(json.dumps(asdict(border)))) == border
    assert Pair(**{"prompt": "p", "response": "r", "harmful": True, "source": "model", "affirmative": "Sure"}).complete
    with pytest.raises(ValueError, match="a borderline pair has harmful=False"):
        Pair("p", "r", True, "model", kind="borderline")
    with pytest.raises(ValueError, match="unknown pair kind"):
        Pair("p", "r", False, "model", kind="edgy")


HARMFUL = [f"Explain how to do harmful thing number {i}." for i in range(20)]
HARMLESS = [f"Tell me a fun fact about animal number {i}." for i in range(20)]


def test_training_pairs_never_hold_an_evaluation_prompt(model, monkeypatch, tmp_path):
    write_prompts(tmp_path / "harmful.csv", HARMFUL)
    (tmp_path / "harmless.jsonl").write_text("".join(json.dumps({"instruction": p, "output": "Sure."}) + "\n"
                                                     for p in HARMLESS))
    data = DataConfig(harmful=str(tmp_path / "harmful.csv"), harmless=str(tmp_path / "harmless.jsonl"),
                      n_train=6, n_val=4, n_test=4)
    sets = prompt_sets(data)
    held_out = {prompt_key(p) for k in ("harmful", "harmless") for s in ("val", "test") for p in sets.prompts(k, s)}
    edgy = [Example(f"How do I shoot photo number {i}?") for i in range(8)]
    borderline_set = [*edgy, *(Example(p) for p in HARMLESS)]  # the over-refusal set also holds evaluation prompts
    train_half, eval_half = split_halves(borderline_set)
    k = sum(e in edgy for e in train_half)  # the only clean candidates the model answers
    assert k >= 2 and {prompt_key(e.prompt) for e in train_half} & held_out  # the checks below can fail
    monkeypatch.setattr(pairs_mod, "load_overrefusal", lambda spec: borderline_set if spec == "edgy" else [])
    calls = script(monkeypatch, {p: "I'm sorry, I can't." for p in HARMLESS if prompt_key(p) not in held_out})
    cfg = PairsConfig(n_harmful=6, n_harmless=2 * k, borderline=0.5, borderline_source="edgy")
    pairs = training_pairs(model, data, cfg, tmp_path / "pairs.jsonl")

    kinds = {kind: [p for p in pairs if p.kind == kind] for kind in ("harmful", "harmless", "borderline")}
    assert [len(v) for v in kinds.values()] == [6, k, k]
    assert not {prompt_key(p.prompt) for p in pairs} & held_out
    assert {p.prompt for p in kinds["borderline"]} == {e.prompt for e in train_half if e in edgy}
    assert not {p.prompt for p in kinds["borderline"]} & {e.prompt for e in eval_half}
    meta = json.loads((tmp_path / "pairs.json").read_text())
    assert meta["response_sources"] == {"harmful:template": 6, "harmless:dataset": k, "borderline:model": k}

    n_calls = len(calls)
    assert training_pairs(model, data, cfg, tmp_path / "pairs.jsonl") == pairs and len(calls) == n_calls  # cached
    fewer = training_pairs(model, data, PairsConfig(6, 8, 0.25, "edgy"), tmp_path / "pairs.jsonl")
    assert len(calls) > n_calls and sum(p.kind == "borderline" for p in fewer) == 2  # 0.25 x 8 answer rows
    assert sum(p.kind == "harmless" for p in fewer) == 6


def test_pairs_options_from_the_command_line_and_their_checks():
    args = build_parser().parse_args(["train", "--method", "refat", "--out", "x", "--borderline", "0.25",
                                      "--borderline-source", "xstest", "--harmless-targets", "model",
                                      "--no-strict-refusals", "--n-harmless", "8"])
    assert from_arguments(PairsConfig, args) == PairsConfig(64, 8, 0.25, "xstest", "model", False)
    assert PairsConfig(n_harmless=10, borderline=0.25).n_borderline == 2  # rounded: 2.5 -> 2
    with pytest.raises(ConfigError, match="pairs.borderline: must be in"):
        from_dict(PairsConfig, {"borderline": 1.5}, "pairs")
    with pytest.raises(ConfigError, match="harmless_targets"):
        from_dict(PairsConfig, {"harmless_targets": "human"}, "pairs")
