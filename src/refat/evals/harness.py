"""Utility scored by lm-evaluation-harness (``UtilityConfig.evaluator="lm-eval"``, the ``lm-eval`` extra).

Published utility numbers come from lm-eval, so a run can be scored by lm-eval itself: its task configs
(data, prompt, few-shot exemplars, filters, metric) and its scoring code, on the model refat already has
in memory. The model goes to lm-eval's ``HFLM`` as an object, never as a path, so whatever is active on
it (an ablation hook, a steering vector, a PEFT adapter) is what lm-eval scores.

What refat keeps: the seeded subset (``n_per_task`` questions per configured task, drawn by the same
rule as refat's own evaluator, so the two pick the same questions from the same list; a group such
as ``mmlu`` draws over all its subtasks' documents together), ``few_shot`` (lm-eval's
``num_fewshot``; lm-eval picks the exemplars, seeded by ``seed``) and ``batch_size``. The output is
refat's ``utility.json`` / ``utility_records.jsonl`` (one record per question: ``correct`` from lm-eval's
``acc`` or, for a generation task, its first metric under the task's first filter; ``correct_norm``
from ``acc_norm``), plus lm-eval's own results JSON (``lm_eval_results.json``: task versions, n-samples,
stderr, configs, environment) beside them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from ..models import Model
from ..storage import write_json
from .utility import TaskResult, UtilityConfig, _subset, write_results

__all__ = ["HarnessRun", "evaluate_harness", "LM_EVAL_RESULTS"]

LM_EVAL_RESULTS = "lm_eval_results.json"
_MISSING = ("UtilityConfig.evaluator='lm-eval' needs lm-evaluation-harness: pip install 'refat[lm-eval]' "
            "(or evaluator: refat, the built-in offline evaluator)")


@dataclass
class HarnessRun:
    tasks: dict[str, TaskResult]  # per configured task, in refat's shape (the report reads these)
    raw: dict  # lm-eval's results JSON without its samples (those are in the records)

    def save(self, out_dir: str | Path, config: UtilityConfig | None = None) -> Path:
        """refat's ``utility.json`` and ``utility_records.jsonl``, and lm-eval's :data:`LM_EVAL_RESULTS`."""
        write_results(self.tasks, out_dir, config)
        write_json(Path(out_dir) / LM_EVAL_RESULTS, self.raw)
        return Path(out_dir)


def _lm_eval():
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as e:
        raise ImportError(_MISSING) from e
    return lm_eval, HFLM, TaskManager


def _task_manager(TaskManager, config: UtilityConfig):
    """lm-eval's task index: a local folder alone when it defines every configured task (indexing lm-eval's
    own ~15 000 task configs takes seconds), else lm-eval's tasks with the folder's taking precedence."""
    folder = None
    if config.lm_eval_tasks is not None:
        folder = str(Path(config.lm_eval_tasks).expanduser())
        if not Path(folder).is_dir():
            raise FileNotFoundError(f"UtilityConfig.lm_eval_tasks: {folder} is not a folder of lm-eval task YAMLs")
        local = TaskManager(include_path=folder, include_defaults=False)
        if all(t in local.all_tasks for t in config.tasks):
            return local
    manager = TaskManager(include_path=folder)
    unknown = [t for t in config.tasks if t not in manager.all_tasks]
    if unknown:
        where = f" or in {folder}" if folder else " (lm_eval_tasks: a folder of your own task YAMLs)"
        raise ValueError(f"UtilityConfig.tasks: lm-eval has no task {', '.join(map(repr, unknown))}{where}")
    return manager


def _doc_ids(samples: list[dict]) -> list[str]:
    """Each document's own ``id`` field (ARC's, say) where every document has a distinct one, else its index."""
    ids = [s["doc"].get("id") if isinstance(s["doc"], dict) else None for s in samples]
    if all(isinstance(i, (str, int)) for i in ids) and len(set(map(str, ids))) == len(ids):
        return [str(i) for i in ids]
    return [str(s["doc_id"]) for s in samples]


def _records(task: str, leaf: str, samples: list[dict]) -> tuple[str, list[dict]]:
    """refat's records of one lm-eval task's logged samples, and the metric ``correct`` comes from."""
    if not samples:
        return "acc", []
    primary = samples[0].get("filter", "none")  # one entry per (filter, document); the task's first filter
    samples = [s for s in samples if s.get("filter", "none") == primary]
    metrics = samples[0]["metrics"]
    metric = "acc" if "acc" in metrics else metrics[0]
    group = "" if leaf == task else leaf
    out = []
    for s, doc_id in zip(samples, _doc_ids(samples), strict=True):
        value = s[metric]
        if value not in (0, 1, True, False):
            raise ValueError(f"lm-eval task {leaf!r} scores {metric}={value!r}, not right or wrong per question; "
                             "UtilityConfig.tasks takes accuracy-style tasks (acc or exact_match)")
        rec = {"task": task, "id": f"{leaf}/{doc_id}" if group else doc_id, "group": group,
               "prompt": s["arguments"][0][0], "correct": bool(value)}
        if s["arguments"] and len(s["arguments"][0]) == 2 and isinstance(s["arguments"][0][1], str):
            rec |= {"choices": [a[1] for a in s["arguments"]], "gold": s["target"],  # log-likelihood choices
                    "logprobs": [float(r[0]) for r in s["filtered_resps"]]}
        else:  # generation: the raw answer and what the filter made of it
            rec |= {"completion": s["resps"][0][0], "pred": s["filtered_resps"][0], "answer": s["target"]}
        if "acc_norm" in s:
            rec["correct_norm"] = bool(s["acc_norm"])
        out.append(rec)
    return metric if primary == "none" else f"{metric},{primary}", out


def evaluate_harness(model: Model, config: UtilityConfig) -> HarnessRun:
    """Score ``model`` as it is in memory (hooks and adapters included) on lm-eval's tasks named in ``config``."""
    lm_eval, HFLM, TaskManager = _lm_eval()
    manager = _task_manager(TaskManager, config)
    top, leaves, samples = [], {}, {}  # leaves: every lm-eval task scored -> the configured task it belongs to
    for task in config.tasks:
        loaded = manager.load([task])
        docs = {name: len(t.eval_docs) for name, t in loaded["tasks"].items()}
        pool = [(leaf, i) for leaf, n in docs.items() for i in range(n)]  # a group draws over its subtasks together
        drawn: dict[str, list[int]] = {}
        for leaf, i in _subset(pool, config.n_per_task, config.seed, task):  # refat's seeded subset
            drawn.setdefault(leaf, []).append(i)
        leaves |= dict.fromkeys(drawn, task)
        # sorted: lm-eval maps its doc ids back by order; a whole task goes unlisted (lm-eval then takes them all)
        samples |= {leaf: sorted(ids) for leaf, ids in drawn.items() if len(ids) < docs[leaf]}
        group = loaded["groups"].get(task)
        # a group whose every subtask has a drawn question goes whole (lm-eval adds its group row); otherwise only
        # the subtasks drawn (lm-eval would take an empty list as "all its documents")
        top += [group] if group is not None and len(drawn) == len(docs) else [loaded["tasks"][k] for k in drawn]
    was_training = model.hf.training  # HFLM switches the model to eval mode; it goes back as it was
    try:
        lm = HFLM(pretrained=model.hf, tokenizer=model.tokenizer, batch_size=config.batch_size,
                  max_length=model.max_prompt_tokens)
        # no global reseeding (lm-eval's default reseeds random, numpy and torch for the whole process)
        res = lm_eval.simple_evaluate(lm, tasks=top, task_manager=manager, num_fewshot=config.few_shot,
                                      samples=samples, log_samples=True,
                                      random_seed=None, numpy_random_seed=None, torch_random_seed=None,
                                      fewshot_random_seed=config.seed)
    finally:
        model.hf.train(was_training)
    logged = res.pop("samples")
    version = res.get("lm_eval_version", "?")
    tasks = {}
    for task in config.tasks:
        names = [leaf for leaf, owner in leaves.items() if owner == task]
        metric, records = "acc", []
        for leaf in names:
            metric, recs = _records(task, leaf, logged.get(leaf, []))
            records += recs
        if not records:
            raise ValueError(f"UtilityConfig.tasks: lm-eval scored no question of {task!r}")
        n = len(records)
        norm = [r["correct_norm"] for r in records if "correct_norm" in r]
        source = f"lm-eval {version}: {task}" + (f" v{res['versions'][task]}" if task in res["versions"] else "")
        if names != [task]:  # a group (or a tag): the subtasks with a question drawn
            source += f" ({len(names)} task{'s' if len(names) > 1 else ''})"
        tasks[task] = TaskResult(task, metric, sum(r["correct"] for r in records) / n, n, source,
                                 int(res["n-shot"].get(names[0], config.few_shot)),
                                 sum(norm) / n if len(norm) == n else None, records)
    from lm_eval.utils import handle_non_serializable

    raw = json.loads(json.dumps(res, default=handle_non_serializable))
    return HarnessRun(tasks, raw)
