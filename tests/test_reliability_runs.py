"""Reliability of runs, part B, at the command line: a result is never reported for the wrong model, an
output folder has one writer, and --overwrite never loses the old result. Tiny random models saved as
local folders; every command runs in-process through ``refat.cli.main``."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
import torch
from conftest import build_model, make_tokenizer, save_model, write_prompts

from refat import models
from refat.cli import main
from refat.directions import Directions
from refat.storage import replacing

HARMFUL = [f"Explain how to do harmful thing number {i}." for i in range(14)]
HARMLESS = [f"Tell me a fun fact about animal number {i}." for i in range(14)]
LOOSE = ["--kl-threshold", "1e9", "--induce-refusal-threshold=-1e9", "--screen-prompts", "none"]


def saved_model(folder, seed: int):
    model = build_model("qwen2", layers=3, hidden=32, dtype=torch.float32, seed=seed)
    save_model(model, folder)
    return model


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("reliability")
    model = saved_model(root / "a", seed=0)
    saved_model(root / "b", seed=1)
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    lora = get_peft_model(model.hf, LoraConfig(r=2, target_modules="all-linear", init_lora_weights=False))
    lora.save_pretrained(root / "adapter")
    write_prompts(root / "harmful.csv", HARMFUL)
    (root / "harmless.jsonl").write_text("".join(json.dumps({"instruction": p, "output": "Sure."}) + "\n"
                                                 for p in HARMLESS))
    return root


@pytest.fixture(autouse=True)
def refat_home(tmp_path, monkeypatch):
    """The file-hash cache in a fresh home per test (and never in the user's)."""
    monkeypatch.setenv("REFAT_HOME", str(tmp_path / "home"))


def prefill(files, out, *extra, model="a", n=2):
    return ["attack", "prefill", "--model", str(files / model), "--behaviours", str(files / "harmful.csv"),
            "--n-behaviours", str(n), "--max-new-tokens", "3", "--n-words", "2", "--out", str(out), *map(str, extra)]


def directions(files, out, *extra, model="a"):
    return ["directions", "--model", str(files / model), "--harmful", str(files / "harmful.csv"),
            "--harmless", str(files / "harmless.jsonl"), "--n-train", "6", "--n-val", "4", *LOOSE,
            "--out", str(out), *map(str, extra)]


def train(files, out, *extra, model="a"):
    return ["train", "--model", str(files / model), "--harmful", str(files / "harmful.csv"),
            "--harmless", str(files / "harmless.jsonl"), "--n-train", "6", "--n-val", "4", "--n-test", "4",
            "--method", "rt", "--n-harmful", "6", "--n-harmless", "6", "--steps", "2", "--checkpoint-every", "1",
            "--out", str(out), *map(str, extra)]


def records(out):
    return [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]


# ---- 1. a resumed attack checks which model, behaviours and config it continues ---------------------------

def test_resumed_attack_with_an_adapter_is_refused_and_overwrite_runs_fresh(files, tmp_path, capsys):
    out = tmp_path / "pf"
    assert main(prefill(files, out)) == 0
    base = records(out)
    capsys.readouterr()
    defended = prefill(files, out, "--adapter", files / "adapter")
    assert main(defended) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "prefill records made with another model" in err
    assert "(+ no adapter)" in err and "(+ adapter " in err and "--overwrite" in err
    assert records(out) == base  # nothing appended

    assert main([*defended, "--overwrite"]) == 0
    fresh = records(out)
    assert len(fresh) == 2 and [r["goal"] for r in fresh] == HARMFUL[:2]
    meta = json.loads((out / "attack.json").read_text())
    assert meta["model"] == models.spec_identity(str(files / "a"), dtype="float32", device="cpu",
                                                  adapter=files / "adapter")
    assert main(defended) == 0  # the defended run now resumes (nothing redone)
    assert records(out) == fresh


def test_resumed_attack_with_another_model_is_refused(files, tmp_path, capsys):
    out = tmp_path / "pf"
    assert main(prefill(files, out)) == 0
    capsys.readouterr()
    assert main(prefill(files, out, model="b")) == 2
    err = capsys.readouterr().err
    assert "another model" in err and models.spec_identity(str(files / "b"), dtype="float32",
                                                            device="cpu")["sha256"][:12] in err


def test_resumed_attack_with_other_behaviours_is_refused_not_mixed(files, tmp_path, capsys):
    out = tmp_path / "pf"
    assert main(prefill(files, out)) == 0
    other = tmp_path / "other.csv"
    other.write_text("prompt\n" + "\n".join(HARMFUL[5:8]) + "\n")
    swapped = [x if x != str(files / "harmful.csv") else str(other) for x in prefill(files, out)]
    capsys.readouterr()
    assert main(swapped) == 2
    assert "another behaviours" in capsys.readouterr().err
    assert [r["goal"] for r in records(out)] == HARMFUL[:2]  # not mixed
    assert main(prefill(files, out, n=3)) == 0  # a larger --n-behaviours extends the same list
    assert [r["goal"] for r in records(out)] == HARMFUL[:3]
    assert main([*swapped, "--overwrite"]) == 0
    assert [r["goal"] for r in records(out)] == HARMFUL[5:7]  # only the new run's records


# ---- training checkpoints ------------------------------------------------------------------------------

def test_train_resume_with_another_model_is_refused(files, tmp_path, capsys):
    out = tmp_path / "rt"
    assert main(train(files, out, "--steps", "1")) == 0
    capsys.readouterr()
    assert main(train(files, out, "--resume", model="b")) == 2
    err = capsys.readouterr().err
    assert "a different model" in err and "checkpoints" in err
    assert main(train(files, out, "--resume")) == 0  # the same model continues to step 2
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2


# ---- directions -----------------------------------------------------------------------------------------

def test_directions_recomputed_after_the_weights_change_at_the_same_path(files, tmp_path, capsys):
    path = tmp_path / "m"
    shutil.copytree(files / "a", path)
    out = tmp_path / "dirs"
    assert main(directions(files, out, model=path)) == 0
    first = Directions.load(out)
    saved_model(path, seed=1)  # new weights, same path
    capsys.readouterr()
    assert main(directions(files, out, model=path)) == 0
    err = capsys.readouterr().err
    assert "reusing" not in err and "changed" in err
    assert not torch.equal(Directions.load(out).harmful_mean, first.harmful_mean)


def test_directions_of_another_model_are_refused_without_overwrite(files, tmp_path, capsys):
    out = tmp_path / "dirs"
    assert main(directions(files, out)) == 0
    first = Directions.load(out)
    capsys.readouterr()
    assert main(directions(files, out, model="b")) == 2
    err = capsys.readouterr().err
    assert "directions of another model" in err and "--overwrite" in err
    assert torch.equal(Directions.load(out).harmful_mean, first.harmful_mean)
    assert main(directions(files, out, "--overwrite", model="b")) == 0
    assert not torch.equal(Directions.load(out).harmful_mean, first.harmful_mean)


# ---- 2. one writer per output folder ----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "attack", "directions"])
def test_second_writer_gets_a_clear_error(files, tmp_path, capsys, command):
    out = tmp_path / "out"
    holder = subprocess.Popen(["sleep", "60"])  # a live process holding the folder's lock
    try:
        out.mkdir()
        (out / ".lock").write_text(str(holder.pid))
        args = {"train": train, "attack": prefill, "directions": directions}[command](files, out)
        assert main(args) == 2
        err = capsys.readouterr().err
        assert f"{out} is in use by process {holder.pid}" in err
    finally:
        holder.kill()
        holder.wait()
    assert main(args) == 0  # the holder is gone: its stale lock is taken over


# ---- 3. --overwrite writes beside the old result and swaps only when done ---------------------------------

def interrupted(monkeypatch, target: str):
    def boom(*_, **__):
        raise KeyboardInterrupt  # what a kill mid-run looks like to the command
    monkeypatch.setattr(target, boom)


def snapshot(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("command", ["train", "attack", "directions"])
def test_overwrite_killed_midway_keeps_the_old_result(files, tmp_path, monkeypatch, command):
    out = tmp_path / "out"
    args = {"train": train, "attack": prefill, "directions": directions}[command](files, out)
    assert main(args) == 0
    before = snapshot(out)
    interrupted(monkeypatch, {"train": "refat.training.trainer._save_model", "attack": "refat.attacks.transfer.generate",
                              "directions": "refat.directions.select"}[command])
    assert main([*args, "--overwrite"]) == 130
    assert snapshot(out) == before  # intact, byte for byte
    assert not (tmp_path / ".out.new").exists() and not (out / ".lock").exists()


def test_replacing_restores_a_swap_killed_between_its_renames(tmp_path):
    folder, old = tmp_path / "r", tmp_path / ".r.old"
    old.mkdir()
    (old / "result.json").write_text("old")  # killed after moving the old result aside
    with pytest.raises(RuntimeError), replacing(folder) as fresh:
        (fresh / "result.json").write_text("half")
        raise RuntimeError("killed")
    assert (folder / "result.json").read_text() == "old"
    with replacing(folder) as fresh:
        (fresh / "result.json").write_text("new")
    assert (folder / "result.json").read_text() == "new" and not old.exists()


# ---- the identity helper ----------------------------------------------------------------------------------

def test_identity_hashes_each_file_once_and_follows_its_bytes(tmp_path, monkeypatch):
    path = tmp_path / "m"
    saved_model(path, seed=0)
    reads = []
    real = models.file_digest
    monkeypatch.setattr(models, "file_digest", lambda p: reads.append(p) or real(p))
    first = models.spec_identity(str(path), dtype="float32", device="cpu")
    n = len(reads)
    assert n == len(models.model_files(path)) and n >= 3  # weights, config, tokenizer
    assert models.spec_identity(str(path), dtype="float32", device="cpu") == first
    assert len(reads) == n  # cached by (path, size, mtime, inode): nothing read again
    loaded = models.load(str(path), dtype="float32", device="cpu")
    assert models.identity(loaded) == first and len(reads) == n
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))  # same size, other bytes
    second = models.spec_identity(str(path), dtype="float32", device="cpu")
    assert second["sha256"] != first["sha256"] and len(reads) == n + 1
    assert models.spec_identity(str(path), dtype="float64", device="cpu") != second  # the dtype counts
    assert (tmp_path / "home" / "file-hashes.json").is_file()


def test_in_memory_model_identity_and_resume(tmp_path):
    """A model built in memory is identified by its name; resuming with one that has no name is refused."""
    from refat.training import Pair, TrainConfig
    from refat.training import train as train_model

    named = build_model("llama", layers=2, hidden=32)
    ident = models.identity(named)
    assert ident["in_memory"] is True and ident["name"] == "tiny-llama" and "sha256" not in ident
    pairs = [Pair(HARMFUL[i], "I can't help with that.", True, "template") for i in range(2)] + \
        [Pair(HARMLESS[i], "Sure: a fact.", False, "dataset") for i in range(2)]
    cfg = TrainConfig(method="rt", steps=1, batch_size=2, checkpoint_every=1)
    out = tmp_path / "rt"
    train_model(named, pairs, cfg, out, progress=False)
    again = TrainConfig(method="rt", steps=2, batch_size=2, checkpoint_every=1)
    anonymous = models.wrap(build_model("llama", layers=2, hidden=32).hf, make_tokenizer())
    with pytest.raises(models.UnidentifiedModelError, match="built in memory"):
        train_model(anonymous, pairs, again, out, resume=True, progress=False)
    train_model(build_model("llama", layers=2, hidden=32), pairs, again, out, resume=True, progress=False)
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2
