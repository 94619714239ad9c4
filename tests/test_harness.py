"""lm-evaluation-harness as the utility evaluator, offline: a local lm-eval task over 12 questions shipped in
tests/data/lm_eval_tasks, scored on a tiny random model already in memory.

lm-eval is in the ``test`` extra; every test but the not-installed one needs it.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from refat import hooks
from refat.configs import ConfigError
from refat.evals import utility
from refat.evals.harness import LM_EVAL_RESULTS, evaluate_harness
from refat.evals.utility import Item, Task, TaskData, UtilityConfig, evaluate_utility
from refat.pipeline import ExperimentConfig, inputs, plan
from refat.pipeline.layout import Layout
from refat.pipeline.stages import evals, report
from refat.storage import read_json, read_jsonl

TASKS_DIR = Path(__file__).parent / "data" / "lm_eval_tasks"
TASK = "refat_tiny_mc"  # tests/data/lm_eval_tasks/refat_tiny_mc.yaml


def lm_eval_config(**kw) -> UtilityConfig:
    return UtilityConfig(**{"tasks": (TASK,), "n_per_task": 8, "batch_size": 4, "evaluator": "lm-eval",
                            "lm_eval_tasks": str(TASKS_DIR)} | kw)


@pytest.fixture
def lm_eval():
    return pytest.importorskip("lm_eval", reason="lm-eval is in the test extra: pip install -e '.[test]'")


@pytest.fixture
def refat_task(monkeypatch):
    """The same JSON lines as refat's own task, in the prompt format of the lm-eval YAML."""
    def load() -> TaskData:
        rows = read_jsonl(TASKS_DIR / f"{TASK}.jsonl")
        items = [Item(r["id"], f"Question: {r['question']}\nAnswer:", tuple(r["choices"]), r["gold"]) for r in rows]
        return TaskData(items, items, "tests/data")
    monkeypatch.setitem(utility.TASKS, TASK, Task("mc", load, load))


def by_id(records: list[dict]) -> dict[str, dict]:
    return {r["id"]: r for r in records}


def test_lm_eval_scores_the_loaded_model_and_its_results_json_is_kept(lm_eval, tiny, tmp_path):
    cfg = ExperimentConfig(name="k", defenses=["base"], utility=lm_eval_config())
    ctx = SimpleNamespace(cfg=cfg, layout=Layout(tmp_path), models=SimpleNamespace(get=lambda subject: tiny))
    folder = ctx.layout.utility("base")
    evals.utility(ctx, folder, subject=cfg.subjects[0])  # the pipeline stage

    raw = read_json(folder / LM_EVAL_RESULTS)
    assert raw["lm_eval_version"] == lm_eval.__version__ and raw["versions"] == {TASK: 1.0}
    assert raw["n-samples"][TASK] == {"original": 12, "effective": 8}
    scores = raw["results"][TASK]
    assert {"acc_stderr,none", "acc_norm_stderr,none"} <= set(scores) and scores["acc_stderr,none"] > 0
    assert "samples" not in raw  # the per-question results are refat's records

    summary = read_json(folder / "utility.json")["tasks"][TASK]  # refat's shape, as the report reads it
    records = read_jsonl(folder / "utility_records.jsonl")
    assert summary["n"] == len(records) == 8 and summary["source"] == f"lm-eval {lm_eval.__version__}: {TASK} v1.0"
    assert summary["accuracy"] == pytest.approx(scores["acc,none"])
    assert summary["accuracy_norm"] == pytest.approx(scores["acc_norm,none"])
    assert all({"task", "id", "correct", "correct_norm", "logprobs"} <= set(r) for r in records)
    table = report._utility(ctx)["base"]
    assert table[TASK]["n"] == 8 and table[TASK]["value"] == pytest.approx(summary["accuracy"])
    assert table[f"{TASK} (norm)"]["value"] == pytest.approx(summary["accuracy_norm"])


def test_refat_and_lm_eval_agree_item_by_item(lm_eval, tiny, refat_task):
    """Same seeded questions, same prompt, same metric: the same choice under acc and acc_norm, and the same
    log-likelihoods, from refat's scorer and from lm-eval's."""
    ours = evaluate_utility(tiny, lm_eval_config(evaluator="refat", lm_eval_tasks=None))[TASK]
    theirs = evaluate_utility(tiny, lm_eval_config())[TASK]  # dispatched to lm-eval
    assert ours.n == theirs.n == 8 and by_id(ours.records).keys() == by_id(theirs.records).keys()
    for id_, r in by_id(ours.records).items():
        t = by_id(theirs.records)[id_]
        assert (r["correct"], r["correct_norm"]) == (t["correct"], t["correct_norm"]), id_
        assert r["logprobs"] == pytest.approx(t["logprobs"], rel=1e-9), id_
    assert any(r["correct"] != r["correct_norm"] for r in ours.records)  # acc and acc_norm are both exercised
    assert (ours.accuracy, ours.accuracy_norm) == (theirs.accuracy, theirs.accuracy_norm)


def test_lm_eval_scores_the_model_under_a_hook_and_an_adapter(lm_eval, tiny, refat_task):
    """lm-eval gets the model object, so an active refat ablation (and a PEFT adapter) is what it scores."""
    config = lm_eval_config()
    plain = by_id(evaluate_harness(tiny, config).tasks[TASK].records)
    direction = torch.randn(tiny.d_model, dtype=tiny.dtype, generator=torch.Generator().manual_seed(0))
    with hooks.ablate(tiny, direction, mode="project"):
        ablated = by_id(evaluate_harness(tiny, config).tasks[TASK].records)
        ours = by_id(evaluate_utility(tiny, dataclasses.replace(config, evaluator="refat", lm_eval_tasks=None))[TASK]
                     .records)
    for id_, r in ablated.items():
        assert r["logprobs"] != pytest.approx(plain[id_]["logprobs"], rel=1e-3), id_
        assert r["logprobs"] == pytest.approx(ours[id_]["logprobs"], rel=1e-9), id_  # refat sees the same ablation

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    adapted = get_peft_model(tiny.hf, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
    lora = by_id(evaluate_harness(dataclasses.replace(tiny, hf=adapted), config).tasks[TASK].records)
    assert all(lora[i]["logprobs"] != pytest.approx(plain[i]["logprobs"], rel=1e-3) for i in plain)


def test_a_generation_task_keeps_lm_eval_s_completions_and_filter(lm_eval, tiny, monkeypatch):
    """GSM8K's shape (greedy answer, a regex filter, exact match): lm-eval's greedy completions are refat's on the
    same prompts, and ``correct`` is its exact match under the task's filter."""
    def load() -> TaskData:
        rows = read_jsonl(TASKS_DIR / "refat_tiny_gen.jsonl")
        items = [Item(r["id"], f"Question: {r['question']}\nAnswer:", answer=r["answer"]) for r in rows]
        return TaskData(items, items, "tests/data")
    monkeypatch.setitem(utility.TASKS, "refat_tiny_gen", Task("gen", load, load))
    theirs = evaluate_harness(tiny, lm_eval_config(tasks=("refat_tiny_gen",))).tasks["refat_tiny_gen"]
    ours = evaluate_utility(tiny, UtilityConfig(tasks=("refat_tiny_gen",), gsm8k_max_new_tokens=8))["refat_tiny_gen"]
    assert theirs.metric == "exact_match,first-number" and theirs.n == 4 and theirs.accuracy_norm is None
    for id_, r in by_id(ours.records).items():
        t = by_id(theirs.records)[id_]
        assert t["completion"] == r["completion"] and t["correct"] == (t["pred"] == t["answer"]), id_


def test_a_group_draws_its_subset_over_all_its_subtasks(lm_eval, tiny):
    """A group (as lm-eval's mmlu): n_per_task questions over its subtasks together, each record named by its
    subtask; all of them: lm-eval's group row (its stderr too) is kept, and matches refat's pooled accuracy."""
    group = "refat_tiny_group"  # refat_tiny_mc and refat_tiny_mc_b, 12 questions each
    whole = evaluate_harness(tiny, lm_eval_config(tasks=(group,), n_per_task=None))
    result, row = whole.tasks[group], whole.raw["results"][group]
    assert result.n == 24 and result.source == f"lm-eval {lm_eval.__version__}: {group} v1.0 (2 tasks)"
    assert {r["id"] for r in result.records} == {f"{t}/q{i}" for t in (TASK, f"{TASK}_b") for i in range(12)}
    assert result.accuracy == pytest.approx(row["acc,none"]) and row["acc_stderr,none"] > 0

    drawn = evaluate_harness(tiny, lm_eval_config(tasks=(group,), n_per_task=5))
    assert drawn.tasks[group].n == sum(n["effective"] for n in drawn.raw["n-samples"].values()) == 5
    assert {r["id"] for r in drawn.tasks[group].records} < {r["id"] for r in result.records}


def test_lm_eval_not_installed_names_the_option_and_the_extra(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # import lm_eval now raises ImportError
    with pytest.raises(ImportError, match=r"evaluator='lm-eval' needs lm-evaluation-harness: "
                                          r"pip install 'refat\[lm-eval\]'"):
        evaluate_utility(tiny, lm_eval_config())
    monkeypatch.setattr(inputs, "_have", lambda module: module != "lm_eval")  # a run fails before any stage
    with pytest.raises(ConfigError, match=r"utility.evaluator: 'lm-eval' needs .*pip install 'refat\[lm-eval\]'"):
        inputs._check_files(ExperimentConfig(name="k", defenses=["base"], utility=lm_eval_config()), False)


def test_evaluator_options_are_checked_and_fingerprinted():
    with pytest.raises(ConfigError, match="evaluator: must be 'refat' or 'lm-eval', got 'helm'"):
        UtilityConfig(evaluator="helm")
    with pytest.raises(ConfigError, match="tasks: unknown task.*or set evaluator: lm-eval"):
        UtilityConfig(tasks=(TASK,))
    with pytest.raises(ConfigError, match="lm_eval_tasks: only used with evaluator: lm-eval"):
        UtilityConfig(lm_eval_tasks=str(TASKS_DIR))
    assert lm_eval_config(lm_eval_tasks=None).tasks == (TASK,)  # lm-eval's names are its own, checked when it runs

    def utility_fingerprint(config: UtilityConfig) -> dict:
        stage = next(s for s in plan(ExperimentConfig(name="k", defenses=["base"], utility=config),
                                     {"spec": "m"}) if s.name == "utility/base")
        return stage.config

    refat = UtilityConfig(tasks=("arc_easy",))  # the default evaluator leaves the stage's inputs as they were
    assert "lm_eval" not in json.dumps(utility_fingerprint(refat))
    assert utility_fingerprint(lm_eval_config(tasks=("arc_easy",)))["utility"]["evaluator"] == "lm-eval"
    assert "evaluator" not in json.dumps(utility_fingerprint(refat)["utility"])


def test_unknown_lm_eval_task_names_the_option(lm_eval, tiny):
    with pytest.raises(ValueError, match=r"UtilityConfig.tasks: lm-eval has no task 'no_such_task' or in "):
        evaluate_harness(tiny, lm_eval_config(tasks=(TASK, "no_such_task")))
