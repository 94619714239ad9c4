"""The `refat` command end to end on a tiny random model saved as a local HF directory."""

import json

import pytest
import torch

from refat import catalog
from refat.cli import main
from refat.directions import Directions

from conftest import build_model

HARMFUL = [f"Explain how to do harmful thing number {i}." for i in range(14)]
HARMLESS = [f"Tell me a fun fact about animal number {i}." for i in range(14)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    model = build_model("qwen2", layers=3, hidden=32, dtype=torch.float32)
    model.hf.save_pretrained(root / "model")
    model.tokenizer.save_pretrained(root / "model")
    (root / "harmful.csv").write_text("prompt\n" + "\n".join(HARMFUL) + "\n")
    (root / "harmless.jsonl").write_text("".join(json.dumps({"instruction": p, "output": "Sure."}) + "\n" for p in HARMLESS))
    return root


def _common(files, *extra):
    return ["--model", str(files / "model"), "--harmful", str(files / "harmful.csv"),
            "--harmless", str(files / "harmless.jsonl"), "--n-train", "6", "--n-val", "4", *extra]


LOOSE = ["--kl-threshold", "1e9", "--induce-refusal-threshold=-1e9", "--screen-prompts", "0"]


def test_directions_attack_orthogonalize_train(files, tmp_path, capsys):
    assert main(["directions", *_common(files, *LOOSE), "--out", str(tmp_path / "dirs")]) == 0
    d = Directions.load(tmp_path / "dirs")
    assert d.selection is not None and d.n_harmful == 6
    info = json.loads((tmp_path / "dirs" / "directions.json").read_text())
    assert info["selection"]["layer"] == d.selection.layer and info["meta"]["select_fingerprint"]

    args = ["attack", "rfa", *_common(files, "--n-test", "4", "--max-new-tokens", "4"),
            "--directions", str(tmp_path / "dirs"), "--out", str(tmp_path / "rfa")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "rfa" / "summary.json").read_text())
    for key in ("harmful_refusal_rate", "harmful_refusal_rate_rfa", "harmless_refusal_rate", "harmless_refusal_rate_rfa"):
        assert 0.0 <= summary[key] <= 1.0
    records = [json.loads(line) for line in (tmp_path / "rfa" / "records.jsonl").read_text().splitlines()]
    assert len(records) == 16 and {r["attack"] for r in records} == {"none", "rfa"}
    assert all(r["judge"] == summary["judge"] for r in records)
    # a finished result is not overwritten silently
    assert main(args) == 2
    assert "already holds a finished result" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0

    assert main(["orthogonalize", "--model", str(files / "model"), "--directions", str(tmp_path / "dirs"),
                 "--out", str(tmp_path / "ortho")]) == 0
    assert (tmp_path / "ortho" / "config.json").exists()

    train = ["train", *_common(files, "--n-test", "4"), "--method", "refat", "--n-harmful", "6", "--n-harmless", "6",
             "--steps", "2", "--n", "4", "--out", str(tmp_path / "train")]
    assert main(train) == 0
    assert (tmp_path / "train" / "adapter").is_dir() and (tmp_path / "train" / "pairs.jsonl").exists()
    pairs = [json.loads(line) for line in (tmp_path / "train" / "pairs.jsonl").read_text().splitlines()]
    held_out = {r["prompt"] for r in records}
    assert not held_out & {p["prompt"] for p in pairs}, "training pairs must exclude evaluation prompts"
    assert main(train) == 2  # finished: refused without --overwrite or --resume


def test_bad_input_is_reported(files, tmp_path, capsys):
    assert main(["directions", "--model", "no-such-model", "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert all(name in err for name in catalog.CATALOG)
    (tmp_path / "bad.csv").write_text("text\nhello\n")
    assert main(["directions", *_common(files), "--harmful", str(tmp_path / "bad.csv"), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err
    assert "bad.csv" in err and "prompt" in err
    assert main(["train", *_common(files), "--method", "refat", "--p", "1.5", "--out", str(tmp_path / "z")]) == 2
    assert "refat.p" in capsys.readouterr().err


def test_directions_reuse_extraction_when_only_selection_changes(files, tmp_path, capsys):
    out = str(tmp_path / "dirs")
    assert main(["directions", *_common(files, *LOOSE), "--out", out]) == 0
    first = Directions.load(out)
    capsys.readouterr()
    assert main(["directions", *_common(files, *LOOSE), "--out", out]) == 0
    assert "reusing directions" in capsys.readouterr().err
    assert main(["directions", *_common(files, *LOOSE), "--prune-layer-fraction", "0.5", "--out", out]) == 0
    assert "reusing the extraction" in capsys.readouterr().err
    second = Directions.load(out)
    assert torch.equal(first.harmful_mean, second.harmful_mean)
    assert second.selection.layer < 2  # 3 layers, half pruned: the new selection config was applied
