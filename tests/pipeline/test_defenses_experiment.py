"""experiments/defenses.py on a tiny model: the attacker chooses on a separate validation set, GCG runs on the
seed-0 models only, and results/defenses.json has the documented schema (behaviours, >= 2 judges, rows with
method, seed, attack, n, asr and ci per judge) with the attacker's choices and the seed means."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import experiment
from test_pipeline import config, files, tiny_utility_data, write  # noqa: F401 (fixtures)

from refat.pipeline import load_config, plan, resolve_inputs, stage_names
from refat.storage import read_json, read_jsonl, write_json

ROOT = Path(__file__).parents[2]
VALIDATION = [f"Describe a dangerous validation request number {i}." for i in range(5)]


def test_defenses_table_from_parts(files, tmp_path):  # noqa: F811
    (files / "validation.csv").write_text("prompt\n" + "\n".join(VALIDATION) + "\n")
    cfg_dict = config(files, defenses=["base", "rt"], train_overrides={}, seeds=[0, 1], overrefusal=None,
                      utility=None, analysis=False, validation=str(files / "validation.csv"),
                      judges=["refusal-prefix:default", "refusal-strings:default"])
    cfg_dict["attacks"] = [
        {"name": "rfa", "config": {"max_new_tokens": 4, "batch_size": 8, "sweep": {"screen_prompts": 2, "top_m": 1}}},
        {"name": "templates", "config": {"source": str(files / "templates.yaml"), "max_new_tokens": 4, "choose": 1,
                                         "choose_prompts": 2, "choose_tokens": 2}, "n_behaviours": 2},
        {"name": "gcg", "config": {"num_steps": 1, "search_width": 4, "topk": 4, "optim_str_init": "x x",
                                   "max_new_tokens": 4}, "n_behaviours": 1, "seeds": [0]}]
    path = write(tmp_path / "tiny.yaml", cfg_dict)
    cfg = load_config(path)
    assert "attacks/rt/gcg" in stage_names(cfg) and "attacks/rt@seed1/gcg" not in stage_names(cfg)

    defenses = experiment("defenses")
    out, results = tmp_path / "runs", tmp_path / "defenses.json"
    defenses.main(["--config", str(path), "--parts", str(tmp_path / "parts"), "--results", str(results),
                   "--out", str(out)])
    assert sorted(p.name for p in (tmp_path / "parts").glob("*.json")) == ["base.json", "rt.json", "rt@seed1.json"]
    assert "## Attack success rate" in (tmp_path / "parts/report/report.md").read_text()
    validation = [r["prompt"] for r in read_jsonl(out / "tiny/data/validation.jsonl")]
    assert validation == VALIDATION  # the attacker's set, none of it attacked
    choice = read_json(out / "tiny/attacks/rt@seed1/templates/choice.json")  # the last part's run
    assert choice["validation_prompts"] == 2 and len(choice["chosen"]) == 1

    table = read_json(results)
    assert "validation.csv" in table["behaviours"] and table["judges"] == cfg.judges
    keys = {"method", "setting", "seed", "attack", "n", "asr", "ci", "degenerate", "disagreement", "choice"}
    assert all(keys <= set(r) for r in table["rows"])
    cells = {(r["setting"], r["seed"], r["attack"]): r for r in table["rows"]}
    assert set(cells) == {(d, s, a) for d, s in (("base", None), ("rt", 0), ("rt", 1))
                          for a in ("none", "rfa", "templates")} | {("base", None, "gcg"), ("rt", 0, "gcg")}
    for r in table["rows"]:
        assert set(r["asr"]) == set(r["ci"]) == set(cfg.judges)
        assert all(0 <= v <= 1 and lo <= v <= hi for v, (lo, hi) in ((r["asr"][j], r["ci"][j]) for j in cfg.judges))
        assert r["n"] == {"none": 4, "rfa": 4, "templates": 2, "gcg": 1}[r["attack"]]
        assert r["disagreement"] is None or 0 <= r["disagreement"] <= 1
        assert r["degenerate"]["n"] == r["n"] and r["degenerate"]["ci"][0] <= r["degenerate"]["value"]
    assert cells["rt", 1, "rfa"]["choice"]["direction"] == "worst-case"
    assert cells["rt", 1, "templates"]["choice"]["templates"] == choice["chosen"]
    means = {(m["setting"], m["attack"]): m for m in table["means"]}
    assert set(means) == {("rt", "none"), ("rt", "rfa"), ("rt", "templates")}  # GCG ran at one seed only
    rfa = [cells["rt", s, "rfa"]["asr"]["refusal-prefix:default"] for s in (0, 1)]
    assert means["rt", "rfa"]["asr"]["refusal-prefix:default"]["mean"] == sum(rfa) / 2
    assert table["models"]["rt@seed1"]["seed"] == 1 and table["models"]["rt@seed1"]["train"]["steps"] == 2

    # the second RFA column, from the run folder while it holds the last part's stages
    selected = experiment("defenses_selected")
    argv = ["--config", str(path), "--run", str(out / "tiny"), "--out", str(tmp_path / "selected"), "--n", "3",
            "--max-new-tokens", "3"]
    with pytest.raises(SystemExit, match="no finished stage directions/lat, train/lat$"):
        selected.main([*argv, "--keys", "base", "lat"])  # nothing is measured
    assert not (tmp_path / "selected").exists()
    written = selected.main([*argv, "--keys", "base", "rt@seed1", "rt"])  # rt's stages wait in stale/
    assert [p.name for p in written] == ["base.json", "rt@seed1.json", "rt.json"]
    column = read_json(tmp_path / "selected" / "rt@seed1.json")
    own = read_json(out / "tiny/directions/rt@seed1/directions.json")["selection"]
    assert column["direction"]["layer"] == own["layer"] and column["direction"]["position"] == own["position"]
    behaviours = [r["id"] for r in read_jsonl(out / "tiny/data/behaviours.jsonl")][:3]
    assert list(column["completions"]) == [f"rfa-selected/{b}" for b in behaviours]
    assert set(column["verdicts"]) == set(cfg.judges) and all(len(v) == 3 for v in column["verdicts"].values())
    for j in cfg.judges:
        rate = column["asr"][j]
        assert rate["n"] == 3 and rate["value"] == sum(v["jailbroken"] for v in column["verdicts"][j]) / 3
    assert selected.main([*argv, "--keys", "base", "rt@seed1"]) == []  # measured: skipped
    assert read_json(tmp_path / "selected" / "rt.json")["direction"]["layer"] == read_json(
        out / "tiny/stale/directions/rt/directions.json")["selection"]["layer"]
    marker = out / "tiny/stale/directions/rt/stage.json"  # directions left from another training of rt
    write_json(marker, read_json(marker) | {"inputs": {"config": {}, "reads": {"train/rt": "0" * 16}}})
    with pytest.raises(SystemExit, match="extracted from training result 0{16}, but .*train/rt holds"):
        selected.main([*argv, "--keys", "rt"])


def test_shipped_defenses_config():
    cfg = load_config(ROOT / "configs" / "defenses.yaml")
    assert cfg.behaviours == "harmbench-test" and cfg.validation == "harmbench-val" and cfg.seeds == [0, 1, 2]
    assert [d.name for d in cfg.variants] == ["base", "rt", "refat"] and len(cfg.judges) >= 2
    assert cfg.worst_case_rfa is not None
    gcg = next(a for a in cfg.attacks if a.name == "gcg")
    assert gcg.seeds == [0] and gcg.n_behaviours >= 10
    assert all(a.parsed().max_new_tokens >= 128 for a in cfg.attacks)


def test_shipped_defenses_configs_resolve_offline():
    """HarmBench test behaviours less near duplicates leave enough to attack; the attacker's set is HarmBench val."""
    for name, n in (("defenses.yaml", 100), ("defenses-1.5b.yaml", 50)):
        cfg = load_config(ROOT / "configs" / name)
        inputs = resolve_inputs(cfg, base_model=False)
        assert len(inputs.behaviours) >= n and all(a.n_behaviours <= n for a in cfg.attacks)
        assert len(inputs.validation) == 41 and not {b.goal for b in inputs.behaviours} & set(inputs.validation)
    small = load_config(ROOT / "configs" / "defenses-1.5b.yaml")
    assert small.model == "qwen2.5-coder-1.5b" and small.seeds == [0] and {a.name for a in small.attacks} == {"rfa", "prefill"}


def test_defender_style_column_attacks_as_many_behaviours_as_the_tables_rfa_column():
    """Both RFA columns pair behaviour by behaviour: without --n the second takes the config's RFA column size."""
    size = experiment("defenses_selected").table_column_size
    assert size(load_config(ROOT / "configs" / "defenses.yaml")) == 100
    assert size(load_config(ROOT / "configs" / "defenses-1.5b.yaml")) == 50


def test_defender_style_column_refuses_an_empty_size(capsys):
    """`--n 0` is an error naming the option, not a silent fall back to the default size."""
    with pytest.raises(SystemExit):
        experiment("defenses_selected").main(["--keys", "base", "--n", "0"])
    assert "--n: at least 1 behaviour, got 0" in capsys.readouterr().err


def test_options_added_for_the_table_keep_earlier_fingerprints(files):  # noqa: F811
    """An attack's `seeds` and the templates' `choose*` options stay out of the attack stage's fingerprint at their
    defaults (runs made before them keep their stages); set, `choose` is part of it and `seeds` still is not."""
    def reads(**templates_config):
        cfg = load_config(write(files / "fp.yaml", config(files, defenses=["base", "rt"], train_overrides={},
                                                          seeds=[0, 1], attacks=[
            {"name": "templates", "config": {"source": str(files / "templates.yaml"), **templates_config},
             "seeds": [0]}])))
        stages = {s.name: s for s in plan(cfg)}
        assert "attacks/rt/templates" in stages and "attacks/rt@seed1/templates" not in stages
        return stages["attacks/base/templates"].config["attack"]

    default = reads()
    assert "seeds" not in default and not {"choose", "choose_prompts", "choose_tokens"} & set(default["config"])
    assert reads(choose=1)["config"]["choose"] == 1
