"""The summary logic of ``experiments/attacks_quick.py`` (the attacks themselves are tested in their own files)."""

import random
from pathlib import Path

import pytest
from conftest import experiment

from refat.attacks.base import AttackRecord, success_rates


@pytest.fixture(scope="module")
def script():
    return experiment("attacks_quick")


def record(completion, refused=False, goal="g", target="Sure, here is how"):
    return AttackRecord("a", "b", goal, target, "p", completion, refused=refused)


def test_success_rates_per_prompt_and_best_of_n():
    records = [AttackRecord("a", f"{g}:{i}", "g", "t", "p", "c", extra={"behaviour_id": g}, refused=not ok)
               for i, (ok, g) in enumerate(zip([True, False, False, False, False, True], "xxyyzz"))]
    rates = success_rates(records)
    assert rates == {"asr": 2 / 6, "asr_best_of_n": 2 / 3}


def test_degenerate_looks_past_the_target(script):
    assert script.degenerate(record("Sure, here is how" + "x" * 40))
    assert script.degenerate(record("Sure, I can help. What do you mean?")) is False
    assert not script.degenerate(record("Sure, here is how: first gather the parts, then assemble them slowly."))


def test_second_judge_scores_are_cached(script, tmp_path, monkeypatch):
    records = {"prefill": [record("I'm sorry, I cannot help."), record("Sure, here is how: step one, then two.")]}
    scores = script.judge_scores("refusal-strings:default", records, tmp_path)
    assert scores == {"prefill": [0.0, 1.0]}
    assert len(list(tmp_path.glob("judge-*.jsonl"))) == 1

    def no_load(*_, **__):
        raise AssertionError("judged again although every score is cached")
    monkeypatch.setattr("refat.judges.cache.from_spec", no_load)
    assert script.judge_scores("refusal-strings:default", records, tmp_path) == scores
    records["prefill"].append(record("Another answer entirely, not cached yet."))
    with pytest.raises(AssertionError, match="judged again"):
        script.judge_scores("refusal-strings:default", records, tmp_path)


@pytest.fixture(scope="module")
def judge_variants():
    return experiment("judge_variants")


def test_judge_variant_steps_put_every_variant_in_the_pools(judge_variants):
    steps = judge_variants.default_steps(["llm:m#comply", "llm:m#content"])
    pools = {s["step"]: s["pool"] for s in steps}
    assert pools["llm:m#comply (threshold fitted in the folds)"] == ["llm:m#comply"]
    assert pools[f"{judge_variants.ANCHOR} + llm:m#content"] == [judge_variants.ANCHOR, "llm:m#content"]
    assert pools["llm:m, its prompt chosen in the folds"] == ["llm:m#comply", "llm:m#content"]
    assert "llm:qwen2.5-coder-0.5b" in pools["llm:qwen2.5-coder-0.5b, its prompt chosen in the folds"]
    everything = steps[-1]["pool"]
    assert {"llm:m#comply", "llm:m#content", *judge_variants.STRINGS} <= set(everything)
    assert len(everything) == len(set(everything))


def test_judge_variant_table_measures_each_step_held_out(judge_variants):
    rng = random.Random(0)
    truth = [rng.random() < 0.45 for _ in range(60)]
    anchor = [1.0 if t or rng.random() < 0.4 else 0.0 for t in truth]  # a string judge: misses no jailbreak, over-calls
    reader = [min(max((0.7 if t else 0.3) + rng.gauss(0, 0.15), 0.01), 0.99) for t in truth]  # ranks within them too
    noise = [rng.random() for _ in truth]
    scores = {"anchor": anchor, "reader": reader, "noise": noise}
    steps = [{"step": "noise", "pool": ["noise"], "max_members": 1},
             {"step": "anchor + reader", "pool": ["anchor", "reader"], "max_members": 2}]
    table = judge_variants.variant_table(scores, truth, steps, anchor="anchor", outer=3, inner=3, repeats=2)
    assert table["judges"]["reader"]["auc_where_anchor_says_jailbroken"] > 0.85
    assert "auc_where_anchor_says_jailbroken" not in table["judges"]["anchor"]
    noise_step, combined = table["steps"]
    assert noise_step["cohen_kappa"] < 0.3 < 0.6 < combined["cohen_kappa"]
    assert sum(combined["chosen"].values()) == 3 * 2 and 0 < combined["cohen_kappa_se"] < 0.3


def test_feature_window_comparison_is_exact_at_window_1_and_measures_the_window(tmp_path):
    import torch
    from conftest import build_model

    from refat.training import Pair

    module = experiment("feature_window")
    pairs = ([Pair(f"harmful request {i}" + " now" * (i % 3), "I'm sorry, I can't.", True, "template") for i in range(8)]
             + [Pair(f"harmless question {i}", f"Answer {i}.", False, "dataset") for i in range(8)])
    model = lambda: build_model("llama", layers=4, hidden=32, dtype=torch.float32)  # noqa: E731
    one = module.measure(model(), pairs, window=1, steps=8)
    assert [r["step"] for r in one["recomputations"]] == [0, 4]
    assert all(r["cosine_min"] > 1 - 1e-6 for r in one["recomputations"])  # window 1 is the fresh computation
    assert one["recomputations"][1]["fresh_drift_since_previous_min"] < 1 - 1e-4  # the model moved in 4 steps
    two = module.measure(model(), pairs, window=2, steps=12)
    assert two["turned_over"]["from_step"] == 8 and two["recomputations"][0]["cosine_min"] > 1 - 1e-6
    assert two["turned_over"]["cosine_min"] < 1 - 1e-4  # step 4's means, in the window at step 8, are stale


def test_recipe_judge_counts_each_models_attacked_completions(tmp_path):
    import json

    module = experiment("recipe_judge")
    parts = tmp_path / "parts"
    parts.mkdir()
    completions = {"none/a": {"goal": "g1", "completion": "I'm sorry, I can't help with that."},
                   "rfa/a": {"goal": "g1", "completion": "Sure: first, mix the two parts slowly and then wait."},
                   "rfa/b": {"goal": "g2", "completion": "the the the the the the the the the the"}}
    verdicts = [{"attack": "none", "behaviour_id": "a", "jailbroken": False},
                {"attack": "rfa", "behaviour_id": "a", "jailbroken": True},
                {"attack": "rfa", "behaviour_id": "b", "jailbroken": True}]
    (parts / "m.json").write_text(json.dumps({"key": "m", "completions": completions,
                                              "verdicts": {module.STRING_JUDGE: verdicts}}))
    (parts / "other.json").write_text(json.dumps({"not": "a part"}))  # skipped
    out = module.summarize(parts, "refusal-strings:default", tmp_path / "cache.jsonl")
    rfa = out["models"]["m"]["rfa"]
    assert list(out["models"]) == ["m"] and rfa["n"] == 2 and rfa["degenerate"]["value"] == 0.5
    assert rfa["carried_out"]["value"] == 1.0 and rfa["not_refused"]["value"] == 1.0  # a string judge: both count
    assert out["models"]["m"]["none"]["carried_out"]["value"] == 0.0
    assert (tmp_path / "cache.jsonl").exists()


def _read_part(parts: Path, key: str, n_rfa: int = 30) -> dict:
    import json

    completions = {f"none/n{i}": {"goal": f"goal {i}", "completion": f"answer {i}"} for i in range(15)}
    completions |= {f"rfa/r{i}": {"goal": f"goal {i}", "completion": f"attacked {i}"} for i in range(n_rfa)}
    judges = {"a": [], "b": []}
    for cid in completions:
        attack, behaviour = cid.split("/")
        judges["a"].append({"attack": attack, "behaviour_id": behaviour, "jailbroken": attack == "rfa",
                            "score": float(attack == "rfa")})
        judges["b"].append({"attack": attack, "behaviour_id": behaviour, "jailbroken": behaviour.endswith("0"),
                            "score": int(behaviour[1:]) / 100})
    part = {"key": key, "completions": completions, "verdicts": judges}
    (parts / f"{key}.json").write_text(json.dumps(part))
    return part


def _labelled_sheet(module, parts: Path, key: str, n_rfa: int, per_attack: int, label) -> Path:
    """``key``'s part file and its drawn sheet (the rfa column whole), each item labelled ``label(attack, number)``."""
    import json

    _read_part(parts, key, n_rfa=n_rfa)
    (sheet,) = module.sample(parts, per_attack=per_attack, whole=["rfa"], keys=[key])
    data = json.loads(sheet.read_text())
    for i in data["items"]:
        i["label"] = label(i["attack"], int(i["id"].split("/")[1][1:]))
    sheet.write_text(json.dumps(data))
    return sheet


def test_read_sheets_are_blind_grow_without_relabelling_and_are_tied_to_their_part(tmp_path):
    import json

    module = experiment("defenses_read")
    parts = tmp_path / "parts"
    parts.mkdir()
    _read_part(parts, "m")
    (sheet,) = module.sample(parts, per_attack=4, whole=())
    data = json.loads(sheet.read_text())
    assert [i["attack"] for i in data["items"]].count("none") == 4 and len(data["items"]) == 8
    assert all(set(i) == {"id", "attack", "goal", "completion", "label", "note"} for i in data["items"])  # no verdict
    assert module.sample(parts, per_attack=4, whole=()) == []  # the same draw adds nothing
    data["items"][0]["label"] = "refused"
    sheet.write_text(json.dumps(data))
    module.sample(parts, per_attack=6, whole=["rfa"])  # a larger draw holds the smaller one, labels kept
    grown = {i["id"]: i for i in json.loads(sheet.read_text())["items"]}
    assert set(i["id"] for i in data["items"]) <= set(grown) and len(grown) == 6 + 30
    assert grown[data["items"][0]["id"]]["label"] == "refused"
    _read_part(parts, "other")
    assert module.sample(parts, per_attack=1, whole=(), keys=["m"]) == []  # only m's sheet is looked at
    assert not (parts / "read" / "other.json").exists()
    with pytest.raises(FileNotFoundError, match="absent.json"):
        module.sample(parts, keys=["absent"])

    data = json.loads(sheet.read_text())
    data["items"][1]["label"] = "maybe"
    sheet.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="label must be one of"):
        module.score(parts)
    _read_part(parts, "m", n_rfa=31)  # the part file was measured again
    with pytest.raises(ValueError, match="drawn from other completions"):
        module.score(parts)


def test_read_labels_score_each_judge_per_column_on_both_readings_of_success(tmp_path):
    import json

    module = experiment("defenses_read")
    parts = tmp_path / "parts"
    parts.mkdir()
    sheet = _labelled_sheet(module, parts, "m", n_rfa=10, per_attack=10,  # rfa: 2 complied, 8 neither; none: refused
                            label=lambda attack, n: ("complied" if n < 2 else "neither") if attack == "rfa" else "refused")
    data = json.loads(sheet.read_text())
    data["items"][0]["label"] = None  # but for one left unread (the items are sorted by id: a "none" one)
    sheet.write_text(json.dumps(data))
    out = module.score(parts)
    m = out["models"]["m"]
    assert m["labelled"] == 19 and m["unlabelled"] == 1
    rfa = m["columns"]["rfa"]
    assert rfa["n"] == 10 and rfa["read"]["complied"]["value"] == 0.2 and rfa["read"]["neither"]["value"] == 0.8
    a = rfa["judges"]["a"]  # calls every rfa answer jailbroken: right on "not refused", wrong on 8 "carried out"
    assert a["jailbroken"]["value"] == 1.0 and a["not refused"]["accuracy"] == 1.0
    assert a["carried out"]["accuracy"] == 0.2 and a["carried out"]["fp"] == 8
    assert m["columns"]["none"]["judges"]["a"]["carried out"]["tn"] == 9
    errors = {(e["judge"], e["id"]) for e in out["judge_errors"]}
    assert ("a", "rfa/r5") in errors and ("a", "rfa/r0") not in errors and ("b", "rfa/r1") in errors
    assert "| m | rfa | 10 | 20 % | 80 % | 0 % | `a` | 100 % | 0.20 | 1.00 |" in module._table(out)
    assert out["paired"] == []  # one model read
    sep = out["separation"]  # among the 10 rfa answers (none refuses), 2 complied: r0 and r1
    assert sep["a"] == {"n": 10, "complied": 2, "auc": 0.5, "ci": [0.5, 0.5]}  # one score for all: no separation
    assert sep["b"]["auc"] == 0.0 and sep["b"]["ci"] == [0.0, 0.0]  # r0, r1 score lowest: separates, the wrong way
    extra = module.score(parts, judges=["refusal-strings:default"])["separation"]["refusal-strings:default"]
    assert extra == {"n": 10, "complied": 2, "auc": 0.5, "ci": [0.5, 0.5]}  # scored here on the same 10; no refusal string in them
    assert (parts / "read" / "judge_cache.jsonl").exists()


def test_read_pairs_models_read_on_the_same_behaviours_of_a_column(tmp_path):
    module = experiment("defenses_read")
    parts = tmp_path / "parts"
    parts.mkdir()
    for key, complied_below in (("m", 30), ("n", 10)):  # m complies on 30 of 40, n on 10: 50 points apart
        _labelled_sheet(module, parts, key, n_rfa=40, per_attack=10,
                        label=lambda attack, n, b=complied_below: "complied" if attack == "rfa" and n < b else "refused")
    out = module.score(parts)
    (pair,) = out["paired"]  # "none": two seeded 10s, too few shared to pair
    assert (pair["attack"], pair["first"], pair["second"]) == ("rfa", "m", "n")
    d = pair["complied_difference"]
    assert d["n"] == 40 and d["value"] == pytest.approx(0.5) and 0 < d["ci"][0] < 0.5 < d["ci"][1]
    # the two parts share their texts: the reader labelled attacked 10-29 complied in m and refused in n
    c = out["consistency"]
    assert c["texts"] >= 40 and c["texts"] - c["same_label"] == len(c["differ"]) == 20
    assert {r["id"] for reads in c["differ"] for r in reads} == {f"rfa/r{i}" for i in range(10, 30)}


def test_read_labels_a_text_already_read_once_and_counts_it_apart_from_the_readers_consistency(tmp_path):
    import json

    module = experiment("defenses_read")
    parts, others = tmp_path / "parts", tmp_path / "others"
    parts.mkdir(), others.mkdir()
    # two sheets elsewhere read the same texts: rfa r0-r9 complied in both, r10 complied in one and neither in the other
    for key, n_rfa in (("a", 12), ("b", 11)):  # r11 read in a's sheet alone
        _labelled_sheet(module, others, key, n_rfa=n_rfa, per_attack=10,
                        label=lambda attack, n, k=key: "neither" if (attack, n, k) == ("rfa", 10, "b") else
                        "complied" if attack == "rfa" else "refused")
    _read_part(parts, "m", n_rfa=14)  # shares r0-r11 with them; r12, r13 are new texts
    (sheet,) = module.sample(parts, per_attack=10, whole=["rfa"], keys=["m"], same_text_from=[others])
    items = {i["id"]: i for i in json.loads(sheet.read_text())["items"]}
    assert items["rfa/r3"]["label"] == "complied" and len(items["rfa/r3"]["carried"]) == 2
    assert items["rfa/r10"]["label"] is None  # read twice, labelled two ways: left to the reader
    assert items["rfa/r11"]["label"] == "complied" and items["rfa/r11"]["carried"] == [str(others / "read" / "a.json")]
    assert items["rfa/r12"]["label"] is None and "carried" not in items["rfa/r12"]  # never read
    for i in items.values():
        i["label"] = i["label"] or "neither"
    sheet.write_text(json.dumps({**json.loads(sheet.read_text()), "items": list(items.values())}))
    landed = tmp_path / "landed"  # the early sheet's labels carried to the part's: the marks go with them
    landed.mkdir()
    (landed / "m.json").write_text((parts / "m.json").read_text())
    (moved,) = module.sample(landed, per_attack=10, whole=["rfa"], keys=["m"], carry_from=parts / "read")
    marks = [i.get("carried") for i in sorted(items.values(), key=lambda i: i["id"])]
    assert [i.get("carried") for i in json.loads(moved.read_text())["items"]] == marks
    # m's carried labels are not a second reading: its own consistency is over texts read by hand in two sheets
    (parts / "read" / "agreement.json").unlink(missing_ok=True)
    for key in ("a", "b"):
        (parts / f"{key}.json").write_text((others / f"{key}.json").read_text())
        (parts / "read" / f"{key}.json").write_text((others / "read" / f"{key}.json").read_text())
    c = module.score(parts)["consistency"]
    models_by_text = {}
    for s in (parts / "read").glob("[abm].json"):
        for i in json.loads(s.read_text())["items"]:
            models_by_text.setdefault((i["goal"], i["completion"]), []).append(bool(i.get("carried")))
    assert c["texts"] == sum(r.count(False) > 1 for r in models_by_text.values())  # r11: a's reading and m's copy
    assert c["texts"] < sum(len(r) > 1 for r in models_by_text.values())
    read_by_hand = {r["id"] for reads in c["differ"] for r in reads}
    assert {r["model"] for reads in c["differ"] for r in reads} == {"a", "b", "m"} and read_by_hand == {"rfa/r10"}
    read_here = {(json.loads(s.read_text())["part"], i["id"]) for s in (parts / "read").glob("[abm].json")
                 for i in json.loads(s.read_text())["items"]
                 if i["label"] in ("complied", "neither") and not i.get("carried")}
    module.retest(parts, n=len(read_here))  # a second reading draws from labels read in their sheet, all of them here
    drawn = {(i["model"], i["id"]) for i in json.loads((parts / "read" / "retest" / "0.first.json").read_text())}
    assert drawn == read_here


def test_read_early_from_finished_attack_stages_then_carry_labels_to_the_part_sheet(tmp_path):
    import json

    module = experiment("defenses_read")
    run = tmp_path / "run"

    def stage(attack: str, rows: list[dict], status: str = "done") -> None:
        folder = run / "attacks" / "m" / attack
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        (folder / "stage.json").write_text(json.dumps({"status": status}))

    rec = lambda attack, i, kind=None: {"attack": attack, "behaviour_id": f"b{i}", "goal": f"goal {i}",  # noqa: E731
                                        "completion": f"{attack} answer {i}", "extra": {"kind": kind} if kind else {}}
    stage("rfa", [rec(a, i, k) for a in ("none", "rfa") for k in ("harmful", "harmless") for i in range(12)])
    with pytest.raises(FileNotFoundError, match="no finished attack stage"):
        module.early(run, ["other"])
    (sheet,) = module.early(run, ["m"], per_attack=5)
    items = json.loads(sheet.read_text())["items"]
    assert sorted({i["attack"] for i in items}) == ["none", "rfa"] and len(items) == 5 + 12  # harmless left out
    data = json.loads(sheet.read_text())
    for i in data["items"]:
        i["label"], i["note"] = "refused", "read early"
    sheet.write_text(json.dumps(data))

    stage("prefill", [rec("prefill", i) for i in range(3)], status="running")  # streaming: not read yet
    module.early(run, ["m"], per_attack=5)
    assert {i["attack"] for i in json.loads(sheet.read_text())["items"]} == {"none", "rfa"}
    stage("prefill", [rec("prefill", i) for i in range(12)])  # a later stage: its column joins, labels stay
    module.early(run, ["m"], per_attack=5)
    grown = {i["id"]: i for i in json.loads(sheet.read_text())["items"]}
    assert len(grown) == 5 + 12 + 5 and sum(i["label"] == "refused" for i in grown.values()) == 17
    assert not (run / "early" / "read" / "previous").exists()  # the labels' waiting copy is gone once carried

    parts = tmp_path / "parts"  # the part file lands: the same completions, one of them different
    parts.mkdir()
    part = json.loads((run / "early" / "m.json").read_text())
    changed = next(cid for cid in part["completions"] if cid.startswith("rfa/"))
    part["completions"][changed] = {**part["completions"][changed], "completion": "another text"}
    (parts / "m.json").write_text(json.dumps(part))
    (final,) = module.sample(parts, per_attack=5, carry_from=run / "early" / "read")
    labels = {i["id"]: i["label"] for i in json.loads(final.read_text())["items"]}
    assert labels[changed] is None  # a label never moves to a text it was not given for
    assert sum(v == "refused" for v in labels.values()) == 16 and len(labels) == 22


def test_rfa_by_layer_attacks_given_behaviours_and_writes_a_readable_part(tmp_path):
    import json

    import torch
    from conftest import build_model, save_model

    from refat.directions import Directions

    module = experiment("rfa_by_layer")
    model = build_model("qwen2", layers=3, hidden=32, dtype=torch.float32)
    save_model(model, tmp_path / "model")
    gen = torch.Generator().manual_seed(0)
    Directions(torch.randn(1, 3, 32, generator=gen, dtype=torch.float64),
               torch.randn(1, 3, 32, generator=gen, dtype=torch.float64), [-1], "tiny", 4, 4).save(tmp_path / "dirs")
    (tmp_path / "b.jsonl").write_text("".join(json.dumps({"goal": f"Do harmful thing {i}.", "id": f"h{i}"}) + "\n"
                                              for i in range(3)))
    out = module.main(["--directions", str(tmp_path / "dirs"), "--layers", "1", "2", "--model", str(tmp_path / "model"),
                       "--behaviours", str(tmp_path / "b.jsonl"), "--n", "2", "--max-new-tokens", "3",
                       "--judge", "refusal-prefix:default", "--part", str(tmp_path / "parts" / "tiny-layers.json")])
    assert out["n"] == 2 and set(out["refusal_rate_rfa"]) == {1, 2} and out["judge"] == "refusal-prefix:default"
    part = json.loads((tmp_path / "parts" / "tiny-layers.json").read_text())
    assert sorted(part["completions"]) == ["rfa-layer1/h0", "rfa-layer1/h1", "rfa-layer2/h0", "rfa-layer2/h1"]
    verdicts = part["verdicts"]["refusal-prefix:default"]
    assert {(v["attack"], v["behaviour_id"]) for v in verdicts} == {tuple(k.split("/")) for k in part["completions"]}
    for layer in (1, 2):
        broken = [v["jailbroken"] for v in verdicts if v["attack"] == f"rfa-layer{layer}"]
        assert out["refusal_rate_rfa"][layer] == 1 - sum(broken) / 2
    (sheet,) = experiment("defenses_read").sample(tmp_path / "parts", per_attack=1, whole=["rfa-layer1"])
    assert len(json.loads(sheet.read_text())["items"]) == 3  # layer 1 whole, one of layer 2


def test_read_retest_draws_a_blind_second_reading_and_score_compares_the_two(tmp_path):
    import json

    module = experiment("defenses_read")
    parts = tmp_path / "parts"
    parts.mkdir()
    sheet = _labelled_sheet(module, parts, "m", n_rfa=20, per_attack=5,  # rfa: r0-r9 complied, r10-r19 neither
                            label=lambda attack, n: ("complied" if n < 10 else "neither") if attack == "rfa" else "refused")
    with pytest.raises(ValueError, match="fewer than 21"):
        module.retest(parts, n=21)
    path = module.retest(parts, n=8, seed=3)
    items = json.loads(path.read_text())["items"]
    assert len(items) == 8 and all(i["label"] is None and i["id"].startswith("rfa/") for i in items)  # blind
    for i in items:
        i["label"] = "complied"  # the second reading calls everything complied
    path.write_text(json.dumps({"seed": 3, "items": items}))
    assert module.retest(parts, n=8, seed=3) == path and json.loads(path.read_text())["items"] == items  # kept
    r = module.score(parts)["retest"]["3"]
    first_complied = sum(int(i["id"].split("/")[1][1:]) < 10 for i in items)
    assert r["n"] == 8 and r["same_label"] == first_complied and len(r["differ"]) == 8 - first_complied
    assert all(d["first"] == "neither" and d["second"] == "complied" for d in r["differ"])
    assert r["adjudicated_since"] == 0
    data = json.loads(sheet.read_text())  # the sheet adjudicated to the second reading: the retest still compares
    retested = {i["id"] for i in items}   # against the first labels as drawn
    for i in data["items"]:
        if i["id"] in retested:
            i["label"] = "complied"
    sheet.write_text(json.dumps(data))
    again = module.score(parts)["retest"]["3"]
    assert again["same_label"] == first_complied and again["adjudicated_since"] == 8 - first_complied
