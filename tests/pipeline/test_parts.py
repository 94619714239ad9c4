"""An experiment run one model at a time (`refat.pipeline.parts`): the narrowed config reuses the full run's stages,
each model's part file alone rebuilds the report's tables, and a file is never measured twice nor overwritten."""

from __future__ import annotations

import json
import shutil

import pytest
from test_pipeline import config, files, tiny_utility_data, write  # noqa: F401 (fixtures)

from refat.configs import ConfigError
from refat.errors import RunError
from refat.pipeline import load_config, parts, run_experiment, stage_names
from refat.storage import read_json


@pytest.fixture(scope="module")
def full_run(files, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("runs")
    cfg_path = write(out / "tiny.yaml", config(files, attacks=[{"name": "rfa", "config": {"max_new_tokens": 4,
                                                                                           "batch_size": 8}}]))
    return run_experiment(cfg_path, out), cfg_path


def test_only_narrows_to_one_model_under_test(files):  # noqa: F811
    cfg = load_config(write(files / "seeds.yaml", config(files, seeds=[0, 1])))
    assert [s.key for s in cfg.only("refat@seed1").subjects] == ["refat@seed1"]
    names = stage_names(cfg.only("refat@seed1"))  # the base model's directions, none of its measurements
    assert "directions/base" in names and not any(n.startswith(("attacks/base/", "utility/base")) for n in names)
    assert cfg.only("refat@seed1").train_overrides == {"refat": {"refat": {"p": 1.0}}}
    assert cfg.only("rt").train_overrides == {}
    assert [s.key for s in cfg.only("base").subjects] == ["base"]
    with pytest.raises(ConfigError, match="no model under test .lat.*base, rt, rt@seed1, refat, refat@seed1"):
        cfg.only("lat")


def test_an_experiment_script_measures_every_defense_at_one_seed_before_the_next(files, tmp_path, monkeypatch):  # noqa: F811
    cfg_path = write(files / "seeds.yaml", config(files, seeds=[0, 1]))
    measured = []
    monkeypatch.setattr(parts, "run_parts", lambda cfg, parts_dir, out, keys: measured.extend(keys))
    monkeypatch.setattr(parts, "write_report", lambda *args: tmp_path / "report.md")
    monkeypatch.setattr(parts, "load_parts", lambda *args: {})
    parts.experiment_main(["--out", str(tmp_path)], description="", config=cfg_path, parts_dir=tmp_path,
                          results=tmp_path / "table.json", summarize=lambda cfg, parts_dir: {})
    assert measured == ["rt", "refat", "rt@seed1", "refat@seed1"]  # a sitting that stops early leaves a comparison


def test_parts_reuse_the_run_and_rebuild_its_tables(full_run, tmp_path, monkeypatch):
    run_dir, cfg_path = full_run
    out = tmp_path / "runs"
    shutil.copytree(run_dir, out / "tiny")
    cfg = load_config(cfg_path)
    written = parts.run_parts(cfg, tmp_path / "results", out)
    assert [p.name for p in written] == ["base.json", "rt.json", "refat.json"]
    stages = read_json(out / "tiny/provenance.json")["stages"]  # the last part's run: nothing of its model recomputed
    assert all(v["status"] == "skipped" for k, v in stages.items() if k.startswith(("train/", "attacks/", "utility/")))

    loaded = parts.load_parts(cfg, tmp_path / "results")
    refat = loaded["refat"]
    assert refat["method"] == "refat" and refat["seed"] == 0 and refat["seconds"]["train/refat"] > 0
    assert refat["cpu_seconds"].keys() == refat["seconds"].keys() and refat["cpu_seconds"]["train/refat"] > 0
    assert refat["train"]["refat"]["p"] == 1.0 and "revision" in refat["provenance"]["git"]
    assert refat["attacks"]["rfa"]["summary"]["direction"] == "worst-case"
    assert set(refat["outcomes"]) == {"utility", "benign.csv", "rfa refusal"}
    assert {r["attack"] for r in refat["verdicts"]["refusal-strings:default"]} == {"none", "rfa"}
    assert all(c["completion"] is not None for c in refat["completions"].values())
    assert {r["prompt"] for r in refat["overrefusal"]["benign.csv"]} == set(refat["outcomes"]["benign.csv"])
    # the tables from the part files alone equal the full run's report
    assert parts.paired(cfg, loaded) == read_json(run_dir / "report/paired.json")
    judged = read_json(run_dir / "judges/refusal-strings_default/rates.json")
    assert parts.asr(cfg, loaded)["refusal-strings:default"] == json.loads(json.dumps(
        {k: judged[k] for k in ("judge", "rates", "n", "ci")}))

    md = parts.write_report(cfg, loaded, tmp_path / "results" / "report")  # the report from the part files alone
    text = md.read_text()
    assert "## Difference from the base model" in text and "## Robustness against over-refusal" in text
    assert text.startswith(f"# refat report: {cfg.name}\n") and "*Not run" not in text.split("## Difference")[0]
    for name in ("overrefusal.json", "utility.json"):  # as the run's report has them (acc_norm aside)
        full = {k: {t: c for t, c in row.items() if not t.endswith("(norm)")}
                for k, row in read_json(run_dir / "report" / name).items()}
        assert read_json(md.parent / name) == full
    assert read_json(md.parent / "asr.json")["refat"]["rfa"]["refusal-strings:default"]["n"] == 4
    assert {x["defense"] for x in read_json(md.parent / "samples.json")["samples"]} == {"base", "rt", "refat"}
    compute = read_json(md.parent / "compute.json")  # the cost counted: each stage's wall time, from the parts
    assert compute["refat"]["train seconds"] == round(refat["seconds"]["train/refat"], 1)
    assert "rfa seconds" in compute["refat"] and "train seconds" not in compute["base"]
    assert compute["refat"]["train CPU seconds"] == round(refat["cpu_seconds"]["train/refat"], 1)
    assert "## Compute cost" in text and "no `compute.json`" not in text

    # a later sitting without the run folder: every model is measured already, nothing runs
    shutil.rmtree(out)
    monkeypatch.setattr(parts, "run_experiment", lambda *a, **k: pytest.fail("ran a measured part again"))
    assert len(parts.run_parts(cfg, tmp_path / "results", out)) == 3


def test_a_part_measured_under_another_config_is_an_error_and_kept(full_run, tmp_path, monkeypatch, files):  # noqa: F811
    run_dir, cfg_path = full_run
    cfg = load_config(cfg_path)
    measured = []
    monkeypatch.setattr(parts, "run_experiment", lambda c, out, model=None: measured.append(c) or run_dir)
    parts.run_parts(cfg, tmp_path, keys=["rt"])  # the base model is always measured: it is every pair's other half
    assert [c.defenses for c in measured] == [["base"], ["rt"]]  # each in its own run: never measured twice
    assert sorted(p.name for p in tmp_path.glob("*.json")) == ["base.json", "rt.json"]

    before = (tmp_path / "rt.json").read_text()
    changed = load_config(write(files / "steps.yaml", config(files, attacks=cfg.resolved()["attacks"],
                                                             train={**config(files)["train"], "steps": 3})))
    assert parts.part_id(changed, "rt") != parts.part_id(cfg, "rt")
    with pytest.raises(RunError, match=r"\.json: measured under another config.*never overwritten"):
        parts.run_parts(changed, tmp_path)
    assert (tmp_path / "rt.json").read_text() == before
    with pytest.raises(RunError, match="no model under test 'cat'"):
        parts.run_parts(cfg, tmp_path, keys=["cat"])
