"""Judge specs: parsed and named without loading a model; every kind built offline from its spec."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model, save_model

from refat.configs import ConfigError
from refat.judges import (
    JUDGE_KINDS,
    ChatJudge,
    HarmBenchJudge,
    JudgeSpec,
    LlamaGuardJudge,
    RefusalStringJudge,
    from_spec,
    judge_name,
    judge_threshold,
    parse_spec,
)
from refat.judges.strings import RefusalPrefixJudge


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random chat model saved like a downloaded one, for the model judges' specs."""
    path = tmp_path_factory.mktemp("judge") / "model"
    model = build_model("qwen2", layers=2, hidden=32, dtype=torch.float32)
    save_model(model, path)
    return path


def test_judge_spec_threshold_parses_and_names_like_the_judge():
    assert judge_name("llm:qwen2.5-coder-1.5b@0.13") == "chat-judge:qwen2.5-coder-1.5b@0.13"
    assert judge_name("llm:qwen2.5-coder-1.5b") == judge_name("llm:qwen2.5-coder-1.5b@0.5") == "chat-judge:qwen2.5-coder-1.5b"
    assert judge_name("harmbench:org/cls@0.25") == "harmbench-cls:org/cls@0.25"
    assert from_spec("refusal-strings:arditi").name == "refusal-strings:arditi"


def test_parse_spec():
    assert parse_spec("refusal-strings:gcg") == JudgeSpec("refusal-strings", "gcg")
    assert parse_spec("refusal-strings") == parse_spec("refusal-strings:") == JudgeSpec("refusal-strings", "default")
    assert parse_spec("llm:org/m@0.13") == JudgeSpec("llm", "org/m", 0.13)
    assert parse_spec("harmbench:m@0.5").name == "harmbench-cls:m"
    assert judge_threshold("llm:m@0.2") == 0.2 and judge_threshold("llm:m") == judge_threshold("refusal-strings") == 0.5


def test_chat_judge_prompt_variant_spec():
    assert parse_spec("llm:org/m#comply@0.3") == JudgeSpec("llm", "org/m", 0.3, "comply")
    assert judge_name("llm:org/m#comply@0.3") == "chat-judge:org/m#comply@0.3"
    assert judge_name("llm:org/m#comply-fewshot") == "chat-judge:org/m#comply-fewshot"
    # the default prompt named explicitly is the default: same judge, same name, same cached scores
    assert parse_spec("llm:org/m#harmbench@0.2") == parse_spec("llm:org/m@0.2") == JudgeSpec("llm", "org/m", 0.2)
    assert parse_spec("harmbench:/models/a#b").arg == "/models/a#b"  # only the chat judge has prompt variants


@pytest.mark.parametrize("spec, message", [
    ("llm:m#nope", "'llm:m#nope': unknown chat judge prompt 'nope'; choose from harmbench, comply"),
    ("llm:#comply", "llm: needs a model"),
    ("strings", "unknown judge 'strings'"),
    ("refusal-strings:nope", "unknown refusal string list 'nope'"),
    ("refusal-prefix:gcg", "unknown refusal string list 'gcg' for refusal-prefix; choose from default"),
    ("llm", "llm: needs a model"),
    ("harmbench:@0.3", "harmbench: needs a model"),
    ("llm:m@1.5", "'llm:m@1.5': the threshold after '@'"),
    ("llama-guard:m@high", "the threshold after '@' must be a number"),
    ("llm:m@0", "the threshold after '@'"),
])
def test_parse_spec_errors_name_where(spec, message):
    with pytest.raises(ConfigError) as info:
        parse_spec(spec, "judges[2]")
    assert str(info.value).startswith("judges[2]: ") and message in str(info.value)
    with pytest.raises(ConfigError, match="^judge: "):
        judge_name(spec)


@pytest.mark.parametrize("kind, cls", [("llm", ChatJudge), ("harmbench", HarmBenchJudge),
                                       ("llama-guard", LlamaGuardJudge)])
def test_from_spec_builds_each_model_judge_offline(model_dir, kind, cls):
    spec = f"{kind}:{model_dir}@0.25"
    judge = from_spec(spec, dtype="float32", device="cpu")
    assert type(judge) is cls and judge.threshold == 0.25
    assert judge.name == judge_name(spec) == f"{JUDGE_KINDS[kind]}:{model_dir}@0.25"
    scores = judge.scores(["do X", "do Y"], ["Sure, here is how", "I'm sorry"])
    assert all(0.0 < s < 1.0 for s in scores)
    assert judge.verdicts(["do X", "do Y"], ["Sure, here is how", "I'm sorry"]) == [s > 0.25 for s in scores]
    assert from_spec(f"{kind}:{model_dir}", dtype="float32", device="cpu").threshold == 0.5


def test_from_spec_builds_a_chat_judge_prompt_variant(model_dir):
    spec = f"llm:{model_dir}#comply@0.25"
    judge = from_spec(spec, dtype="float32", device="cpu")
    assert type(judge) is ChatJudge and judge.prompt_name == "comply" and judge.threshold == 0.25
    assert judge.name == judge_name(spec) and judge.version == parse_spec(spec).version
    assert "[REQUEST]:\ndo X" in judge.prompt("do X", "ok")
    assert all(0.0 < s < 1.0 for s in judge.scores(["do X"], ["Sure, here is how"]))


def test_from_spec_refusal_strings():
    judge = from_spec("refusal-strings")
    assert judge == RefusalStringJudge("default") and judge.name == judge_name("refusal-strings")


def test_refusal_prefix_spec():
    assert JUDGE_KINDS["refusal-prefix"] == "refusal-prefix"
    assert parse_spec("refusal-prefix") == parse_spec("refusal-prefix:default") == JudgeSpec("refusal-prefix", "default")
    assert judge_name("refusal-prefix:default") == judge_name("refusal-prefix") == "refusal-prefix:default"
    assert judge_threshold("refusal-prefix") == 0.5
    judge = from_spec("refusal-prefix:default")
    assert type(judge) is RefusalPrefixJudge and judge.name == "refusal-prefix:default"
    assert type(from_spec("refusal-strings:gcg")) is RefusalStringJudge
