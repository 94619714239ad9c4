"""The judge-score cache: keys and file names are pinned, and a cached pair is never judged again."""

from __future__ import annotations

from dataclasses import replace

import pytest

from refat.judges import cache_path, cached_scores, classifiers, parse_spec, slug, strings
from refat.judges.classifiers import ChatJudge
from refat.storage import digest, read_jsonl


def key(spec: str, goal: str, completion: str) -> str:
    s = parse_spec(spec)
    return digest([s.name, s.version, goal, completion])


def test_cache_key_and_file_name_are_pinned(tmp_path):
    # the key gained the judge's version once, on purpose (scores of an edited prompt or list were served
    # stale); from here on changing the key or the file name re-judges every cached run
    assert parse_spec("llm:qwen2.5-coder-1.5b@0.13").version == "56aedafad68de111"
    assert parse_spec("refusal-strings:default").version == "446e2f765319e9a5"
    assert parse_spec("llm:qwen2.5-coder-0.5b#comply-fewshot").version == "dafae3bd3a277cd9"
    assert key("llm:qwen2.5-coder-1.5b@0.13", "Write a phishing email", "Sure, here is one: Dear customer") \
        == "3cdf2102bc9084af"
    assert key("refusal-strings:default", "g", "I'm sorry") == "76ca259e63906f17"
    assert cache_path(tmp_path, "llm:qwen2.5-coder-1.5b@0.13") == tmp_path / "judge-llm_qwen2.5-coder-1.5b_0.13.jsonl"
    long = "harmbench:/very/long/path/to/a/local/model/folder/that/is/long/HarmBench-Llama-2-13b-cls@0.25"
    assert cache_path(tmp_path, long).name == "judge-harmbench_very_long_path_to_a_local_model_folder_fa236d9c.jsonl"
    assert len(slug(long)) == 57 and slug("a b/c") == "a_b_c"


def test_cached_scores_judge_each_pair_once(tmp_path, monkeypatch):
    spec, path = "refusal-strings:default", tmp_path / "cache" / "judge.jsonl"
    pairs = [("g", "I'm sorry, I cannot help."), ("g", "Sure, here is how: step one.")]
    assert cached_scores(spec, pairs, path) == [0.0, 1.0]
    assert {r["key"] for r in read_jsonl(path)} == {key(spec, g, c) for g, c in pairs}

    def no_load(*_, **__):
        raise AssertionError("judged again although every score is cached")
    monkeypatch.setattr("refat.judges.cache.from_spec", no_load)
    assert cached_scores(spec, pairs[::-1], path) == [1.0, 0.0]  # in the order asked
    with pytest.raises(AssertionError, match="judged again"):
        cached_scores(spec, pairs + [("g", "Not cached yet.")], path)


def test_judge_version_follows_its_rule(monkeypatch, tiny):
    """A judge's version changes with its string list, matching rule, prompt template or threshold, and the
    version a spec names is the one its judge has (so cached scores are found without loading the model)."""
    base = parse_spec("refusal-strings:default").version
    assert parse_spec("refusal-prefix:default").version != base  # another matching rule
    assert parse_spec("refusal-strings:gcg").version != base
    assert strings.RefusalStringJudge("default").version == base
    assert parse_spec("llm:m@0.2").version != parse_spec("llm:m@0.3").version
    assert parse_spec("llm:m").version != parse_spec("harmbench:m").version  # another prompt
    assert ChatJudge(tiny, threshold=0.3).version == ChatJudge.version_of(tiny.name, 0.3)
    monkeypatch.setitem(strings.PREFIX_LISTS, "default", strings.PREFIX_LISTS["default"] + ("Nope",))
    assert parse_spec("refusal-strings:default").version != base  # an edited list re-judges
    before = parse_spec("llm:m@0.3").version
    monkeypatch.setattr(ChatJudge, "template", ChatJudge.template + " Be brief.")
    assert parse_spec("llm:m@0.3").version != before  # an edited prompt re-judges


def test_chat_prompt_variant_versions(monkeypatch, tiny):
    """Each prompt variant has its own version (its text and worked examples decide it); the default's is untouched."""
    versions = {p: parse_spec(f"llm:m#{p}").version for p in classifiers.CHAT_PROMPTS}
    assert len(set(versions.values()) | {parse_spec("llm:m").version}) == len(versions) + 1
    assert parse_spec("llm:m#harmbench").version == parse_spec("llm:m").version
    assert ChatJudge(tiny, prompt_name="comply", threshold=0.3).version == parse_spec(f"llm:{tiny.name}#comply@0.3").version
    few = classifiers.CHAT_PROMPTS["comply-fewshot"]
    monkeypatch.setitem(classifiers.CHAT_PROMPTS, "comply-fewshot", replace(few, examples=few.examples[:-1]))
    assert parse_spec("llm:m#comply-fewshot").version != versions["comply-fewshot"]  # edited examples re-judge
    assert parse_spec("llm:m#comply").version == versions["comply"]


def test_edited_judge_rejudges_cached_pairs(tmp_path, monkeypatch):
    spec, path = "refusal-strings:default", tmp_path / "judge.jsonl"
    pairs = [("g", "Nope, not doing that.")]
    assert cached_scores(spec, pairs, path) == [1.0]  # no refusal string matches
    monkeypatch.setitem(strings.PREFIX_LISTS, "default", strings.PREFIX_LISTS["default"] + ("Nope",))
    assert cached_scores(spec, pairs, path) == [0.0]  # the edited list judged anew, not the stale score
