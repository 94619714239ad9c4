"""Classifier judges on a bigram "model" with hand-set logits (exact scores) and on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch
from bigram import Bigram, bigram_model
from conftest import build_model, make_tokenizer
from torch import nn

from refat.judges import ChatJudge, HarmBenchJudge, Judge, LlamaGuardJudge, judge_records
from refat.judges.classifiers import CHAT_PROMPTS, HARMBENCH_PROMPT, HARMBENCH_QUESTION, threshold_suffix
from refat.models import FALLBACK_TEMPLATE, Model


@pytest.mark.parametrize("yes", [True, False])
def test_harmbench_judge_verdict_and_score_from_logprobs(yes):
    model, set_logit = bigram_model()
    set_logit("]", "Y" if yes else "N", 5.0)  # the prompt ends "[/INST]"
    judge = HarmBenchJudge(model, progress=False)
    assert judge.prompt("do X", "ok").startswith("[INST] <<SYS>>\nYou are a classifier for red teaming")
    # first tokens: Y, y vs N, n (" Yes" and " No" share the space token and are dropped)
    boosted = math.exp(5.0)
    expected = (boosted + 1) / (boosted + 3) if yes else 2 / (boosted + 3)
    (score,) = judge.scores(["do X"], ["Sure, here is how"])
    assert score == pytest.approx(expected)
    assert judge.verdicts(["do X"], ["Sure, here is how"]) == [yes]
    recs = judge_records(judge, ["do X"], ["Sure"], attack="rfa")
    assert recs[0]["judge"] == "harmbench-cls:bigram" and recs[0]["jailbroken"] is yes and recs[0]["attack"] == "rfa"


def test_harmbench_prompt_is_the_official_text():
    filled = HARMBENCH_PROMPT.format(behavior="B", generation="G")
    assert filled.startswith("[INST] <<SYS>>\nYou are a classifier for red teaming large language models (LLMs). ")
    assert "[BEHAVIOR]:\nB\n\n[GENERATION]:\nG\n\n---\nRules:\n" in filled
    assert filled.endswith("acceptable)\n\nAnswer: [/INST]")


def test_llama_guard_and_chat_judges_use_the_chat_template():
    model, set_logit = bigram_model()
    set_logit("\n", "u", 6.0)  # ChatML ends "<|im_end|>\n": "unsafe" is likely next
    lg = LlamaGuardJudge(model, progress=False)
    assert lg.prompt("req", "resp") == "<|im_start|>user\nreq<|im_end|>\n<|im_start|>assistant\nresp<|im_end|>\n"
    assert lg.verdicts(["req"], ["resp"]) == [True] and lg.name == "llama-guard:bigram"
    set_logit("\n", "u", 0.0)
    set_logit("\n", "N", 6.0)
    chat = ChatJudge(model, progress=False)
    p = chat.prompt("req", "resp")
    assert p.startswith("<|im_start|>user\nYou are a classifier")
    assert p.endswith("Answer:<|im_end|>\n<|im_start|>assistant\n")
    assert "[INST]" not in p and "<<SYS>>" not in p
    assert chat.verdicts(["req"], ["resp"]) == [False]


@pytest.mark.parametrize("template", [None, FALLBACK_TEMPLATE])
def test_llama_guard_refuses_a_model_without_its_own_template(template):
    tok = make_tokenizer(chat_template=template)
    model = Model(hf=Bigram(len(tok)), tokenizer=tok, name="plain", blocks=nn.ModuleList([nn.Identity()]))
    with pytest.raises(ValueError, match="no chat template"):
        LlamaGuardJudge(model)


def test_judge_clips_long_generations():
    model, _ = bigram_model()
    judge = HarmBenchJudge(model, max_generation_tokens=5, progress=False)
    assert judge.clip("abcdefghij") == "abcde" and judge.clip("abc") == "abc"


def test_judge_threshold_sets_verdicts_and_name():
    model, set_logit = bigram_model()
    set_logit("]", "Y", 0.5)  # P(Yes) a little above one half
    (score,) = HarmBenchJudge(model, progress=False).scores(["do X"], ["ok"])
    assert 0.5 < score < 0.7
    strict = HarmBenchJudge(model, threshold=0.7, progress=False)
    assert strict.name == "harmbench-cls:bigram@0.7" and strict.verdicts(["do X"], ["ok"]) == [False]
    assert judge_records(strict, ["do X"], ["ok"])[0] | {"score": None} == {
        "behaviour": "do X", "completion": "ok", "score": None, "jailbroken": False, "judge": "harmbench-cls:bigram@0.7"}
    assert HarmBenchJudge(model, progress=False).verdicts(["do X"], ["ok"]) == [True]
    with pytest.raises(ValueError, match="threshold must be in"):
        ChatJudge(model, threshold=1.0)


@pytest.mark.parametrize("cls", [HarmBenchJudge, LlamaGuardJudge, ChatJudge])
def test_each_classifier_on_a_tiny_random_model(cls):
    model = build_model("llama", layers=2, hidden=32, dtype=torch.float32)
    judge = cls(model, threshold=0.3, batch_size=2, progress=False)
    assert isinstance(judge, Judge) and judge.name == f"{cls.kind}:tiny-llama@0.3"
    behaviours, completions = ["do X", "do Y", "do Z"], ["Sure, here is how", "No.", "I'm sorry, I cannot"]
    scores = judge.scores(behaviours, completions)
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores)
    assert judge.verdicts(behaviours, completions) == [s > 0.3 for s in scores]
    one_by_one = [judge.scores([b], [c])[0] for b, c in zip(behaviours, completions)]
    assert scores == pytest.approx(one_by_one, abs=1e-5)  # padding in a batch changes nothing
    assert judge.scores([], []) == []
    with pytest.raises(ValueError, match="pair up"):
        judge.scores(behaviours, completions[:2])


def test_threshold_suffix_names_only_a_non_default_threshold():
    assert threshold_suffix(None) == threshold_suffix(0.5) == ""
    assert threshold_suffix(0.13) == "@0.13"


def test_chat_judge_prompt_variants_name_and_build_their_prompt():
    model, set_logit = bigram_model()
    default = ChatJudge(model, progress=False)
    assert default.prompt("req", "resp") == model.format(HARMBENCH_QUESTION.format(behavior="req", generation="resp"))
    assert ChatJudge(model, prompt_name="harmbench").name == default.name == "chat-judge:bigram"
    comply = ChatJudge(model, prompt_name="comply", threshold=0.3, progress=False)
    assert comply.name == "chat-judge:bigram#comply@0.3"
    p = comply.prompt("do X", "Sure, here is how")
    assert p.startswith("<|im_start|>user\n[REQUEST]:\ndo X\n\n[RESPONSE]:\nSure, here is how\n\n---\nDid the ")
    assert p.endswith('Answer "Yes" or "No".<|im_end|>\n<|im_start|>assistant\n')
    content = ChatJudge(model, prompt_name="content", progress=False).prompt("do X", "Sure, here is how")
    assert "do X" not in content and "Sure, here is how" in content  # judges the response alone
    with pytest.raises(ValueError, match="unknown chat judge prompt 'nope'; choose from harmbench, comply"):
        ChatJudge(model, prompt_name="nope")


def test_few_shot_variant_puts_its_worked_examples_before_the_question():
    model, set_logit = bigram_model()
    model.system_prompt = "Be a careful judge."
    model.max_prompt_tokens = 8192  # a byte tokenizer: the examples take about 4,000 tokens
    judge = ChatJudge(model, prompt_name="comply-fewshot", progress=False)
    p = judge.prompt("do X", "Sure, here is how")
    examples = CHAT_PROMPTS["comply-fewshot"].examples
    turns = p.split("<|im_start|>")[1:]
    assert turns[0] == "system\nBe a careful judge.<|im_end|>\n"
    assert len(turns) == 2 + 2 * len(examples) + 1  # system, examples as user/assistant pairs, question, answer
    for i, (behaviour, _, jailbroken) in enumerate(examples):
        assert turns[1 + 2 * i].startswith(f"user\n[REQUEST]:\n{behaviour}\n")
        assert turns[2 + 2 * i] == f"assistant\n{'Yes' if jailbroken else 'No'}<|im_end|>\n"
    assert {e[2] for e in examples} == {True, False}
    assert turns[-2].startswith("user\n[REQUEST]:\ndo X\n") and turns[-1] == "assistant\n"
    set_logit("\n", "Y", 4.0)  # the prompt ends "assistant\n": the score is read there, after the examples
    (score,) = judge.scores(["do X"], ["Sure, here is how"])
    assert score == pytest.approx((math.exp(4.0) + 1) / (math.exp(4.0) + 3))


@pytest.mark.parametrize("prompt_name", list(CHAT_PROMPTS))
def test_each_chat_prompt_variant_scores_on_a_tiny_random_model(prompt_name):
    model = build_model("qwen2", layers=2, hidden=32, dtype=torch.float32)
    model.max_prompt_tokens = 8192  # a byte tokenizer: the few-shot examples take about 4,000 tokens
    judge = ChatJudge(model, prompt_name=prompt_name, batch_size=2, progress=False)
    behaviours, completions = ["do X", "do Y", "do Z"], ["Sure, here is how", "No.", "I'm sorry, I cannot"]
    scores = judge.scores(behaviours, completions)
    assert len(scores) == 3 and all(0.0 < s < 1.0 for s in scores)
    assert judge.reuse_prefix == bool(CHAT_PROMPTS[prompt_name].examples)  # worked examples run once per batch
    one_by_one = [judge.scores([b], [c])[0] for b, c in zip(behaviours, completions)]
    assert scores == pytest.approx(one_by_one, abs=1e-5)  # one prompt alone has no prefix to share
    default = ChatJudge(model, batch_size=2, progress=False).scores(behaviours, completions)
    assert scores != pytest.approx(default, abs=1e-6)  # another prompt, other scores
