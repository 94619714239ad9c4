"""`refat demo` is `refat run demo` (the packaged preset) with the demo's summary and table; run folders are locked."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import build_model, save_model, write_prompts

from refat.cli import main
from refat.pipeline import load_config, run_experiment
from refat.pipeline.demo import PRESETS, demo_config
from refat.storage import FolderLockedError, folder_lock

HARMFUL = [f"Explain how to do harmful thing number {i}." for i in range(14)]
HARMLESS = [f"Tell me a fun fact about animal number {i}." for i in range(14)]
SUMMARY_KEYS = {"harmful_refusal_rate", "harmful_refusal_rate_rfa", "harmless_refusal_rate",
                "harmless_refusal_rate_rfa", "layer", "position", "n_harmful", "n_harmless", "judge", "model",
                "model_source", "config", "seconds", "versions", "worst_case"}


@pytest.fixture(scope="module")
def overrides(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("demo")
    model = build_model("qwen2", layers=3, hidden=32, dtype=torch.float32)
    save_model(model, root / "model")
    write_prompts(root / "harmful.csv", HARMFUL)
    (root / "harmless.jsonl").write_text("".join(json.dumps({"instruction": p}) + "\n" for p in HARMLESS))
    return [f"model={root / 'model'}", f"data.harmful={root / 'harmful.csv'}", f"data.harmless={root / 'harmless.jsonl'}",
            "data.n_train=6", "data.n_val=4", "data.n_test=4", "selection.kl_threshold=1e9",
            "selection.induce_refusal_threshold=-1e9", "selection.screen_prompts=null", "selection.batch_size=8",
            "attacks.0.config.max_new_tokens=4", "device=cpu"]


def test_demo_is_a_run_of_the_packaged_preset(overrides, tmp_path, capsys):
    assert main(["demo", *overrides, "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "harmful refused" in out and "harmless refused" in out
    summary = json.loads((tmp_path / "demo" / "summary.json").read_text())
    assert set(summary) == SUMMARY_KEYS
    assert summary["n_harmful"] == 4 and summary["n_harmless"] == 4 and summary["judge"] == "refusal-strings:default"
    assert all(0 <= summary[k] <= 1 for k in SUMMARY_KEYS if k.endswith("rate") or k.endswith("rfa"))
    assert (tmp_path / "demo" / "report" / "report.md").is_file()
    records = [json.loads(x) for x in (tmp_path / "demo/attacks/base/rfa/records.jsonl").read_text().splitlines()]
    assert len(records) == 16 and {r["attack"] for r in records} == {"none", "rfa"}
    # beside the defender-style selection (top level), the attacker's worst case on the validation prompts
    worst = summary["worst_case"]
    assert "RFA selected" in out and "RFA worst case" in out and worst["label"] == "rfa"
    assert worst["direction"] == "worst-case" and 0 <= worst["member"]["val_refusal_rate"] <= 1
    assert worst["member"]["description"] in out and (tmp_path / "demo/attacks/base/rfa/sweep.json").is_file()
    assert all(r["extra"]["direction"]["description"] == worst["member"]["description"]
               for r in records if r["attack"] == "rfa")
    selected = json.loads((tmp_path / "demo/attacks/base/rfa-selected/summary.json").read_text())
    assert selected["direction"] == "selected" and (selected["layer"], selected["position"]) == (summary["layer"],
                                                                                                 summary["position"])

    # the same preset through `refat run` computes nothing new: same stages, same fingerprints
    assert main(["run", "demo", *overrides, "name=demo", "--out-root", str(tmp_path)]) == 0
    prov = json.loads((tmp_path / "demo" / "provenance.json").read_text())
    assert {s["status"] for s in prov["stages"].values()} == {"skipped"}


def test_demo_preset_keeps_the_demo_settings():
    cfg = demo_config()
    assert cfg.defenses == ["base"] and [a.name for a in cfg.attacks] == ["rfa", "rfa"]
    assert [(a.label, a.parsed().direction) for a in cfg.attacks] == [("rfa-selected", "selected"), ("rfa", "worst-case")]
    assert cfg.first_rfa.parsed().max_new_tokens == 48 and cfg.dtype == "float32"
    assert (cfg.selection.kl_threshold, cfg.selection.induce_refusal_threshold) == (0.2, -1.5)
    assert (cfg.data.n_train, cfg.data.n_val, cfg.data.n_test) == (128, 32, 50)
    assert load_config(PRESETS / "demo.yaml").name == "demo"


def test_a_bad_override_names_the_key(overrides, tmp_path, capsys):
    assert main(["demo", *overrides, "data.n_tset=3", "--out", str(tmp_path / "d")]) == 2
    assert "unknown key(s) 'n_tset'" in capsys.readouterr().err
    assert main(["demo", "attacks.7.config.max_new_tokens=3", "--out", str(tmp_path / "d")]) == 2
    assert "attacks.7.config.max_new_tokens=3" in capsys.readouterr().err


def test_a_run_folder_is_locked_while_written(overrides, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "demo").mkdir()
        (tmp_path / "demo" / ".lock").write_text(str(holder.pid))
        with pytest.raises(FolderLockedError, match=f"in use by process {holder.pid}"):
            run_experiment(demo_config(tmp_path / "demo", overrides), tmp_path)
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(tmp_path / "demo"):  # its process is gone: a stale lock is taken over
        assert (tmp_path / "demo" / ".lock").read_text() == str(os.getpid())
    assert not (tmp_path / "demo" / ".lock").exists()


def test_an_override_changes_exactly_that_field_and_the_fingerprint():
    base = demo_config()
    changed = demo_config(overrides=["data.n_test=20"])
    diff = {k for k, v in base.resolved().items() if changed.resolved()[k] != v}
    assert diff == {"data"} and changed.data.n_test == 20
    assert {k for k, v in vars(base.data).items() if getattr(changed.data, k) != v} == {"n_test"}
    assert changed.hash() != base.hash()


def test_credentials_in_an_endpoint_url_are_never_written(tmp_path):
    from refat.chat import redact
    from refat.pipeline import ExperimentConfig

    secret = "http://user:s3cret@example.org:8000/v1?api-key=abc123"
    cfg = ExperimentConfig(name="leak", defenses=["base"], analysis=False, attacks=[
        {"name": "pair", "config": {"attacker": secret, "attacker_model": "m", "n_streams": 1, "n_iterations": 1}}])
    assert cfg.attacks[0].parsed().attacker == secret  # the run itself uses the credentials
    text = json.dumps(cfg.resolved())
    assert "s3cret" not in text and "abc123" not in text and "example.org:8000/v1" in text
    assert redact(["refat", "run", f"attacks.0.config.attacker={secret}"])[2] == \
        "attacks.0.config.attacker=http://example.org:8000/v1?api-key=***"
