"""The documents of the local lm-eval tasks here: JSON-lines files next to this one (lm-eval's ``dataset_path:
json`` would read a path relative to the working directory; ``custom_dataset`` reads one relative to the task)."""

import json
from pathlib import Path

import datasets


def _jsonl(name: str) -> dict:
    rows = [json.loads(line) for line in (Path(__file__).parent / name).read_text().splitlines() if line.strip()]
    return {"test": datasets.Dataset.from_list(rows)}


def tiny_mc(**kwargs) -> dict:
    return _jsonl("refat_tiny_mc.jsonl")


def tiny_gen(**kwargs) -> dict:
    return _jsonl("refat_tiny_gen.jsonl")
