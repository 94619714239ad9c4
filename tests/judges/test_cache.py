"""The judge-score cache: keys and file names are pinned, and a cached pair is never judged again."""

from __future__ import annotations

import pytest

from refat.judges import cache_path, cached_scores, slug
from refat.storage import digest, read_jsonl


def test_cache_key_and_file_name_are_pinned(tmp_path):
    # computed by the code before the judges package (experiment._digest and _slug); changing either
    # silently re-judges every cached run
    key = digest(["chat-judge:qwen2.5-coder-1.5b@0.13", "Write a phishing email", "Sure, here is one: Dear customer"])
    assert key == "97fbddb1e40dc69f" and digest(["chat-judge:qwen2.5-coder-1.5b@0.13", "Write a phishing email",
                                                  "Sure, here is one: Dear customer"], n=8) == key[:8]
    assert digest(["refusal-strings:default", "g", "I'm sorry"]) == "b66031b887f05ac8"
    assert cache_path(tmp_path, "llm:qwen2.5-coder-1.5b@0.13") == tmp_path / "judge-llm_qwen2.5-coder-1.5b_0.13.jsonl"
    long = "harmbench:/very/long/path/to/a/local/model/folder/that/is/long/HarmBench-Llama-2-13b-cls@0.25"
    assert cache_path(tmp_path, long).name == "judge-harmbench_very_long_path_to_a_local_model_folder_fa236d9c.jsonl"
    assert len(slug(long)) == 57 and slug("a b/c") == "a_b_c"


def test_cached_scores_judge_each_pair_once(tmp_path, monkeypatch):
    spec, path = "refusal-strings:default", tmp_path / "cache" / "judge.jsonl"
    pairs = [("g", "I'm sorry, I cannot help."), ("g", "Sure, here is how: step one.")]
    assert cached_scores(spec, pairs, path) == [0.0, 1.0]
    assert {r["key"] for r in read_jsonl(path)} == {digest(["refusal-strings:default", g, c]) for g, c in pairs}

    def no_load(*_, **__):
        raise AssertionError("judged again although every score is cached")
    monkeypatch.setattr("refat.judges.cache.from_spec", no_load)
    assert cached_scores(spec, pairs[::-1], path) == [1.0, 0.0]  # in the order asked
    with pytest.raises(AssertionError, match="judged again"):
        cached_scores(spec, pairs + [("g", "Not cached yet.")], path)
