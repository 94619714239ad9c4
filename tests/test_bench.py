"""The benchmark suite's new cases smoke-run on a tiny random model and report finite, positive ratios."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # bench/ is a top-level folder of the checkout, not part of the installed package
    sys.path.insert(0, str(ROOT))

from bench import estimate as est  # noqa: E402
from bench import gcg_vs_nanogcg, memory, roofline  # noqa: E402
from bench import run as bench  # noqa: E402
from bench.common import row  # noqa: E402
from refat.models import Model  # noqa: E402


def _rows(data: dict, prefix: str) -> list[dict]:
    return [r for r in data["results"] if r["name"].startswith(prefix)]


def test_new_cases_smoke_run_on_tiny_model(tmp_path):
    out = tmp_path / "bench.json"
    ballast = bytearray(512 * 2**20)  # the parent's peak: a child must not report it as its own
    ballast[::4096] = b"\x01" * len(range(0, len(ballast), 4096))
    bench.main(["--tiny", "--only", "extraction", "roofline", "memory", "--out", str(out)])
    parent_peak = memory._peak_gib()
    del ballast
    data = json.loads(out.read_text())
    assert data["settings"]["cases"] == ["extraction", "roofline", "memory"]
    assert data["machine"]["cpu_count"] >= 1 and "torch" in data["machine"]
    counts = {"extraction:": 1, "roofline:": 3, "memory:": 2}
    for prefix, n in counts.items():
        rows = _rows(data, prefix)
        assert len(rows) == n, (prefix, rows)
        assert all(math.isfinite(r["value"]) and r["value"] > 0 for r in rows), rows
    assert len(data["results"]) == sum(counts.values())
    # achieved FLOP/s cannot exceed the matmul peak by much: a wrong FLOP count (x2, x1000) would show here
    for r in _rows(data, "roofline:")[1:]:
        assert r["value"] < 1.5, r
    # ru_maxrss is KiB on Linux: a tiny model's training process holds ~0.3-1 GiB (torch + transformers)
    mem = data["details"]["memory"]["peak_gib"]
    assert 0.05 < mem["imports"] <= mem["loaded"] <= mem["trained"] < 8
    assert mem["imports"] < parent_peak - 0.4, (mem, parent_peak)  # ru_maxrss would inherit the parent's peak
    assert _rows(data, "memory: peak RSS GiB")[0]["met"] is True
    ext = data["details"]["extraction"]
    assert ext["prompts_per_side"] == 4 and set(ext["prompts_per_s"]) == {"bare_forward", "extract"}


def test_forward_flops_by_hand(model_factory):
    m = model_factory("llama", layers=2, hidden=32, heads=4)  # MLP 64, 2 KV heads of 8, 260-token vocabulary
    per_layer = 32 * 32 + 2 * (32 * 16) + 32 * 32 + 3 * (32 * 64)
    assert roofline.matmul_params(m) == (2 * per_layer, 260 * 32)
    assert roofline.attention_width(m) == 32
    # two prompts of 3 and 5 tokens: blocks on 8 tokens, the head on 2 last positions, attention 3² + 5²
    expected = 2 * (2 * per_layer) * 8 + 2 * (260 * 32) * 2 + 4 * 2 * 32 * (9 + 25)
    assert roofline.forward_flops(m, [3, 5]) == expected
    # LoRA step: 2x the frozen forward, 3x adapters and attention
    step = roofline.lora_step_flops(m, tokens=8, rows=2, lora_params=100)
    assert step == 2 * 2 * (2 * per_layer + 260 * 32) * 8 + 3 * 2 * 100 * 8 + 3 * 4 * 2 * 32 * 2 * 16
    # the vocabulary projection only at the 3 positions that predict a response token
    step = roofline.lora_step_flops(m, tokens=8, rows=2, lora_params=100, targets=3)
    assert step == 2 * 2 * (2 * per_layer * 8 + 260 * 32 * 3) + 3 * 2 * 100 * 8 + 3 * 4 * 2 * 32 * 2 * 16


def test_gcg_case_passes_its_options_to_the_harness(tmp_path, monkeypatch):
    seen = {}

    def fake_run(model_dir, *, model, **kw):
        seen.update(kw, model_dir=model_dir, model=model)
        return [row("gcg: nanoGCG/refat seconds per step (width 7)", 2.0, ">= 1.5", True)], {"ratio": 2.0}

    monkeypatch.setattr(gcg_vs_nanogcg, "run", fake_run)
    out = tmp_path / "gcg.json"
    bench.main(["--tiny", "--only", "gcg", "--gcg-steps", "5", "--gcg-search-width", "7", "--out", str(out)])
    assert seen["steps"] == 5 and seen["search_width"] == 7 and seen["rounds"] == 1
    assert isinstance(seen["model"], Model) and Path(seen["model_dir"]).name == "tiny"
    assert seen["optim_str_init"] == "x" * 20  # byte-level tiny tokenizer: a 20-token suffix
    data = json.loads(out.read_text())
    assert data["results"][0]["value"] == 2.0 and data["details"]["gcg"]["ratio"] == 2.0


def test_default_run_has_every_case_and_its_estimate_is_about_the_measured_twenty_minutes():
    plan = bench.make_plan(bench.parse_args([]))
    assert plan.cases == list(bench.CASES)
    assert "gcg" not in bench.make_plan(bench.parse_args(["--skip", "gcg"])).cases
    total = est.estimate(plan, est.REF_PARAMS)["total"]
    # measured: 19 min 19 s on 2 cores (BENCHMARKS.md) with one training round; RT and ReFAT now run 3 (+5.5 min)
    assert 15 * 60 < total < 26 * 60, total
    assert "probe" not in plan.cases and bench.make_plan(bench.parse_args(["--only", "probe"])).cases == ["probe"]
    # the recorded RESULTS.md commands keep their meaning: --repeats 2 gives the training case one round
    assert bench.repeats_for("training", 2, tiny=False) == 1 and bench.repeats_for("hooks", 7, tiny=False) == 7
    assert bench.make_plan(bench.parse_args(["--tiny"])).repeats == dict.fromkeys(plan.cases, 1)


def test_gcg_profile_groups_every_operator_of_a_step(tmp_path):
    from bench.gcg_vs_nanogcg import make_tiny
    from bench.profile_gcg import group_of, profile

    assert group_of("aten::addmm") == "matmul" and group_of("aten::copy_") == "copies and cache"
    assert group_of("aten::some_new_op") == "other"
    res = profile(str(make_tiny(tmp_path / "tiny")), steps=1, search_width=8, topk=16)
    assert len(res["step_seconds"]) == 1 and res["profiled_cpu_seconds"] > 0
    assert sum(g["share"] for g in res["groups"].values()) == pytest.approx(1.0)
    assert res["groups"]["matmul"]["seconds"] > 0 and res["top_ops"][0]["calls"] >= 1


def test_training_rounds_and_probe_case_on_tiny_model(tmp_path, monkeypatch):
    def no_nanogcg(*args, **kwargs):
        raise RuntimeError("no nanoGCG in this test")

    monkeypatch.setattr(gcg_vs_nanogcg, "run_nanogcg", no_nanogcg)
    out = tmp_path / "bench.json"
    data = bench.main(["--tiny", "--only", "training", "probe", "--out", str(out)])
    assert not data["failed"], data["failed"]
    rows = {r["name"]: r["value"] for r in data["results"]}
    train = data["details"]["training"]
    assert train["rounds"] >= 3 and len(train["refat_rt_per_round"]) == train["rounds"]
    median = next(v for k, v in rows.items() if k.startswith("training: refat/rt seconds per step"))
    assert rows["training: refat/rt, lowest round"] <= median <= rows["training: refat/rt, highest round"]
    window = next(v for k, v in rows.items() if k.startswith("training: refat window 4/rt seconds per step"))
    assert rows["training: refat window 4/rt, lowest round"] <= window <= rows["training: refat window 4/rt, highest round"]
    assert len(train["refat_window_rt_per_round"]) == train["rounds"] == len(train["seconds_per_step_steady"]["rt"])
    # the window run recomputed at steps 0 (all n prompts of each kind) and 4 (a quarter of them: 8 + 8)
    assert [h["prompts"] for h in train["recompute_history"]] == [64, 16]
    assert 0 < rows["training: refat window 4 recomputation tokens, steady state / all n"] < 0.5
    probe = data["details"]["probe"]
    assert probe["nanogcg"].startswith("not run") and len(probe["runs"]["probe"][0]["probe_agreement"]) == 2
    assert 0 < rows["probe: candidates the target scores per step, probe sampling / plain"] < 1
