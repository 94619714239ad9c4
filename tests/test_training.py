"""The training package: loss masking, RFA on harmful rows only, feature recomputation, resumable
checkpoints, divergence handling, input validation, the CAT/LAT attack and data parallelism.

Every model is a tiny random Llama (4 layers, d=32, float32); every run is a few steps long.
"""

from __future__ import annotations

import dataclasses
import json
import multiprocessing
import os
import socket
import traceback
from functools import partial
from pathlib import Path

import pytest
import torch
from conftest import build_model
from safetensors.torch import load_file, save_file

from refat import hooks
from refat.errors import InputError
from refat.storage import FinishedRunError
from refat.training import AdversarialConfig, Pair, RefatConfig, TrainConfig, TrainingDivergedError, train
from refat.training import trainer as trainer_mod
from refat.training.data import collate, encode, response_loss
from refat.training.perturbations import AdversarialPerturbation, RefatPerturbation
from refat.training.presets import preset_config

HARMFUL = [f"harmful request number {i}" + " please" * (i % 3) for i in range(8)]
HARMLESS = [f"harmless question {i}" + " thanks" * (i % 2) for i in range(8)]
PAIRS = ([Pair(p, "I'm sorry, I can't.", True, "template", f"Sure, here is {i}") for i, p in enumerate(HARMFUL)]
         + [Pair(p, f"Answer {i} is here.", False, "dataset") for i, p in enumerate(HARMLESS)])


def fresh(seed: int = 0):
    """A new tiny base model; every ``train`` call needs its own (training wraps it in adapters)."""
    return build_model("llama", layers=4, hidden=32, dtype=torch.float32, seed=seed)


def make_cfg(method: str = "refat", **kw) -> TrainConfig:
    kw.setdefault("steps", 6)
    kw.setdefault("batch_size", 4)
    kw.setdefault("max_length", 96)
    kw.setdefault("refat", RefatConfig(n=4, k=2))
    kw.setdefault("adversarial", AdversarialConfig(steps=2))
    return TrainConfig(method=method, **kw)


def run(method: str = "refat", out=None, *, resume=False, overwrite=False, model=None, **kw):
    return train(model or fresh(), PAIRS, make_cfg(method, **kw), out, resume=resume, overwrite=overwrite,
                 progress=False)


def trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.hf.named_parameters() if p.requires_grad}


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter" / "adapter_model.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys() and a
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def summary(out: Path) -> dict:
    return json.loads((out / "train_summary.json").read_text())


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def model():
    """A shared tiny model for tests that never train it (its weights stay untouched)."""
    return fresh()


@pytest.fixture(autouse=True)
def _single_process(monkeypatch):
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)


# ---------------------------------------------------------------------------------------------
# 1. Loss masking


def test_collate_masks_prompt_and_padding(model):
    pairs = [PAIRS[0], PAIRS[9], PAIRS[2], PAIRS[8]]  # harmful, harmless, harmful (longer prompt), harmless
    batch = collate(model, pairs, 96)
    tok = model.tokenizer
    assert batch.input_ids.shape == batch.labels.shape == batch.attention_mask.shape
    assert batch.harmful.tolist() == [True, False, True, False]
    lengths = []
    for i, p in enumerate(pairs):
        ids, n_prompt = encode(model, p.prompt, p.response, 96)
        lengths.append(len(ids))
        assert batch.prompt_lengths[i].item() == n_prompt
        # prompts start at position 0 (right padding) and are exactly the chat-formatted prompt
        assert batch.input_ids[i, :len(ids)].tolist() == ids
        assert tok.decode(ids[:n_prompt]) == model.format(p.prompt)
        assert batch.attention_mask[i, :len(ids)].eq(1).all() and batch.attention_mask[i, len(ids):].eq(0).all()
        assert batch.input_ids[i, len(ids):].eq(tok.pad_token_id).all()
        # labels: -100 on the prompt and the padding, the ids themselves on the response
        assert batch.labels[i, :n_prompt].eq(-100).all()
        assert batch.labels[i, len(ids):].eq(-100).all()
        assert torch.equal(batch.labels[i, n_prompt:len(ids)], batch.input_ids[i, n_prompt:len(ids)])
        # the response tokens are the response followed by the template's end-of-turn
        target = tok.decode(batch.labels[i, n_prompt:len(ids)].tolist())
        assert target == p.response + "<|im_end|>\n"
        assert tok.convert_tokens_to_ids("<|im_end|>") in batch.labels[i].tolist()
    assert len(set(lengths)) > 1, "the test needs rows of different lengths to exercise padding"
    assert batch.input_ids.shape[1] == max(lengths)
    assert batch.n_tokens == sum(lengths)


def test_response_loss_is_full_cross_entropy_but_projects_only_response_positions(model):
    batch = collate(model, [PAIRS[0], PAIRS[9], PAIRS[2]], 96)
    targets = batch.labels[:, 1:]
    with torch.no_grad():
        logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        full = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                                                 reduction="sum")
        seen = []
        handle = model.hf.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(args[0].shape))
        try:
            loss = response_loss(model, batch.input_ids, batch.attention_mask, batch.labels)
            mean = response_loss(model, batch.input_ids, batch.attention_mask, batch.labels, reduction="mean")
        finally:
            handle.remove()
    torch.testing.assert_close(loss, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(mean, full / targets.ne(-100).sum(), rtol=1e-5, atol=1e-5)
    labelled = int(targets.ne(-100).sum())
    assert labelled < targets.numel() // 2, "the test needs prompt and padding positions to skip"
    assert seen == [torch.Size([1, labelled, model.d_model])] * 2  # only positions that predict a response token


def test_trainer_hands_freed_memory_back_before_and_after_every_step(tmp_path, monkeypatch):
    from refat.memory import release_freed_memory

    assert release_freed_memory() in (True, False)  # callable on any platform (a no-op without glibc)
    calls = []
    monkeypatch.setattr(trainer_mod, "release_freed_memory", lambda: calls.append(1))
    run("rt", tmp_path / "run", steps=3)
    assert len(calls) == 2 * 3


def test_collate_truncates_response_and_refuses_long_prompt(model):
    ids, n_prompt = encode(model, PAIRS[0].prompt, PAIRS[0].response, 96)
    short = collate(model, [PAIRS[0]], n_prompt + 3)
    assert short.input_ids.shape[1] == n_prompt + 3
    assert (short.labels[0] != -100).sum().item() == 3
    assert short.labels[0, n_prompt:].tolist() == ids[n_prompt:n_prompt + 3]
    with pytest.raises(ValueError, match="max_length"):
        collate(model, [PAIRS[0]], n_prompt)


def test_affirmative_batch_and_shards(model):
    pairs = [PAIRS[0], PAIRS[8], PAIRS[1], PAIRS[9]]
    batch = collate(model, pairs, 96, with_affirmative=True)
    assert batch.affirm is not None and len(batch.affirm.harmful) == 2
    for j, p in enumerate([PAIRS[0], PAIRS[1]]):
        n = batch.affirm.prompt_lengths[j].item()
        assert n == batch.prompt_lengths[2 * j].item()
        assert model.tokenizer.decode(batch.affirm.labels[j, n:][batch.affirm.labels[j, n:] != -100].tolist()) \
            == p.affirmative + "<|im_end|>\n"
    # a data-parallel shard keeps its rows' affirmative targets and remembers the global rows
    shard = batch.select(torch.tensor([2, 3]))
    assert shard.rows.tolist() == [2, 3] and shard.global_size == 4
    assert shard.prompts == [PAIRS[1].prompt, PAIRS[9].prompt]
    assert torch.equal(shard.affirm.input_ids, batch.affirm.input_ids[1:2])
    assert batch.select(torch.tensor([1, 3])).affirm is None  # no harmful rows: nothing to attack


# ---------------------------------------------------------------------------------------------
# 2. RFA perturbs only harmful rows


def _forward_capture(model, batch, ctx=None):
    from contextlib import nullcontext
    with (ctx or nullcontext()), hooks.capture(model) as acts, torch.no_grad():
        logits = model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    return {l: a[0] for l, a in acts.items()}, logits


def test_rfa_ablates_only_harmful_rows(model):
    batch = collate(model, [PAIRS[0], PAIRS[8], PAIRS[1], PAIRS[9]], 96)
    harmful, harmless = batch.harmful, ~batch.harmful
    pert = RefatPerturbation(model, RefatConfig(p=1.0, n=4), HARMFUL, HARMLESS)
    pert.before_step(0)
    assert pert.directions.shape == (model.n_layers, model.d_model)
    assert pert.layers == [1, 2, 3]
    assert pert.rows(batch, 0).tolist() == harmful.tolist()

    base, base_logits = _forward_capture(model, batch)
    abl, abl_logits = _forward_capture(model, batch, pert.context(batch, 0))
    mask = batch.attention_mask.bool()
    for l in pert.layers:
        u = hooks.unit(pert.directions[l])
        before = base[l] @ u
        after = abl[l] @ u
        assert before[harmful][mask[harmful]].abs().max() > 1e-2  # there was something to remove
        scale = abl[l].norm(dim=-1)
        assert (after[harmful].abs() <= 1e-5 * (1 + scale[harmful]))[mask[harmful]].all()
        assert torch.equal(abl[l][harmless], base[l][harmless])  # harmless rows bit-identical
        assert not torch.equal(abl[l][harmful], base[l][harmful])
    assert torch.equal(abl[0], base[0])  # layer 0 is not in the ablated range
    assert torch.equal(abl_logits[harmless], base_logits[harmless])
    assert not torch.allclose(abl_logits[harmful], base_logits[harmful])

    off = RefatPerturbation(model, RefatConfig(p=0.0, n=4), HARMFUL, HARMLESS)
    off.before_step(0)
    assert not off.rows(batch, 0).any()
    same, same_logits = _forward_capture(model, batch, off.context(batch, 0))
    assert all(torch.equal(same[l], base[l]) for l in base) and torch.equal(same_logits, base_logits)


def test_rfa_coins_depend_on_step_only_and_shards_agree(model):
    batch = collate(model, [PAIRS[i] for i in (0, 1, 2, 3, 8, 9, 10, 11)], 96)
    pert = RefatPerturbation(model, RefatConfig(p=0.5, n=4), HARMFUL, HARMLESS, seed=3)
    draws = [pert.rows(batch, s) for s in range(8)]
    assert all(not d[~batch.harmful].any() for d in draws)  # never a harmless row
    assert len({tuple(d.tolist()) for d in draws}) > 1  # the coins change with the step
    again = RefatPerturbation(model, RefatConfig(p=0.5, n=4), HARMFUL, HARMLESS, seed=3)
    assert all(torch.equal(again.rows(batch, s), draws[s]) for s in range(8))
    for rank in range(2):  # a data-parallel shard draws the global batch's coins for its rows
        rows = torch.arange(rank, 8, 2)
        assert all(torch.equal(pert.rows(batch.select(rows), s), draws[s][rows]) for s in range(8))


def _ready(model, seed: int = 0, **cfg) -> RefatPerturbation:
    pert = RefatPerturbation(model, RefatConfig(n=4, **cfg), HARMFUL, HARMLESS, seed=seed)
    pert.before_step(0)
    return pert


def _projection(acts: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return acts @ hooks.unit(direction)


@pytest.mark.parametrize("positions", [None, [-1, -2, -3]])
def test_one_direction_ablation_removes_one_drawn_feature_from_the_whole_stream(model, positions):
    """Per harmful row, one drawn layer's feature (with ``positions``: read at a drawn post-instruction position,
    the worst-case RFA's candidates) is removed from every layer; harmless rows are untouched."""
    batch = collate(model, [PAIRS[i] for i in (0, 1, 2, 3, 8, 9, 10, 11)], 96)
    harmful, mask = batch.harmful, batch.attention_mask.bool()
    pert = _ready(model, p=1.0, ablation="one-direction", positions=positions)

    def sites(d):
        at = pert.direction_positions(batch, d) if positions else torch.full((8,), -1)
        return list(zip(pert.direction_layers(batch, d).tolist(), at.tolist()))

    draw = next(d for d in range(50) if len({s for s, h in zip(sites(d), harmful) if h}) >= 3)
    drawn = sites(draw)
    assert {l for l, _ in drawn} <= set(pert.layers) and {q for _, q in drawn} <= set(positions or [-1])
    if positions:
        assert len({q for (_, q), h in zip(drawn, harmful) if h}) >= 2  # several positions drawn
        assert torch.equal(pert.features[pert.positions.index(-1)], pert.directions)
        assert (pert.features[pert.positions.index(-2)] - pert.directions).abs().max() > 1e-3
    base, base_logits = _forward_capture(model, batch)
    abl, abl_logits = _forward_capture(model, batch, pert.context(batch, draw))
    for i in harmful.nonzero().flatten().tolist():
        own = pert.at_position(drawn[i][1])[0][drawn[i][0]]
        for l in range(model.n_layers):  # every layer, also those before 25 % depth: the attack's form
            after = _projection(abl[l][i], own)[mask[i]]
            assert after.abs().max() <= 1e-5 * (1 + abl[l][i].norm(dim=-1).max()), (i, l)
        other = next(l for l in pert.layers if l != drawn[i][0])  # not each layer's own feature at that layer
        assert _projection(abl[other][i], pert.directions[other])[mask[i]].abs().max() > 1e-3
    assert torch.equal(abl_logits[~harmful], base_logits[~harmful])
    assert all(torch.equal(abl[l][~harmful], base[l][~harmful]) for l in base)


def test_per_layer_ablation_at_drawn_positions_removes_each_layers_feature_read_there(model):
    batch = collate(model, [PAIRS[i] for i in (0, 1, 2, 3, 8, 9, 10, 11)], 96)
    harmful, mask = batch.harmful, batch.attention_mask.bool()
    pert = _ready(model, p=1.0, positions=[-1, -2, -3])
    draw = next(d for d in range(50) if len(set(pert.direction_positions(batch, d)[harmful].tolist())) >= 2)
    at = pert.direction_positions(batch, draw)
    base, base_logits = _forward_capture(model, batch)
    abl, abl_logits = _forward_capture(model, batch, pert.context(batch, draw))
    for i in harmful.nonzero().flatten().tolist():
        features = pert.at_position(at[i].item())[0]
        for l in pert.layers:  # each layer's own feature, read at the row's drawn position, gone at that layer
            after = _projection(abl[l][i], features[l])[mask[i]]
            assert after.abs().max() <= 1e-5 * (1 + abl[l][i].norm(dim=-1).max()), (i, l)
        assert torch.equal(abl[0][i], base[0][i])  # before 25 % depth: untouched
    assert torch.equal(abl_logits[~harmful], base_logits[~harmful])


def test_random_ablation_hits_only_the_drawn_layers_and_positions(model):
    batch = collate(model, [PAIRS[i] for i in (0, 1, 2, 3, 8, 9, 10, 11)], 96)
    harmful, mask = batch.harmful, batch.attention_mask.bool()
    pert = _ready(model, p=1.0, ablation="random", layer_prob=0.5, position_prob=0.3)
    layers, positions = pert.random_sites(batch, 0)
    assert layers.shape == (8, len(pert.layers)) and positions.shape == batch.input_ids.shape
    base, _ = _forward_capture(model, batch)
    abl, _ = _forward_capture(model, batch, pert.context(batch, 0))
    checked = 0
    for i in harmful.nonzero().flatten().tolist():
        at = [l for l, on in zip(pert.layers, layers[i].tolist()) if on]
        if not at:
            assert all(torch.equal(abl[l][i], base[l][i]) for l in base)
            continue
        sites, rest = positions[i] & mask[i], ~positions[i] & mask[i]
        for l in range(at[0]):  # nothing happens to this row before its first drawn layer
            assert torch.equal(abl[l][i], base[l][i])
        assert torch.equal(abl[at[0]][i][rest], base[at[0]][i][rest])  # nor at the positions not drawn
        for l in at:
            after = _projection(abl[l][i], pert.directions[l])
            assert (after[sites].abs() <= 1e-5 * (1 + abl[l][i][sites].norm(dim=-1))).all(), (i, l)
        checked += int(sites.any())
    assert checked >= 2
    assert all(torch.equal(abl[l][~harmful], base[l][~harmful]) for l in base)


@pytest.mark.parametrize("ablation", ["one-direction", "random"])
@pytest.mark.parametrize("mode", ["mean", "subtract"])
def test_new_ablations_in_every_mode_change_harmful_rows_only(model, ablation, mode):
    batch = collate(model, [PAIRS[i] for i in (0, 1, 8, 9)], 96)
    pert = _ready(model, p=1.0, ablation=ablation, mode=mode, layer_prob=1.0)
    base, base_logits = _forward_capture(model, batch)
    _, logits = _forward_capture(model, batch, pert.context(batch, 0))
    assert torch.equal(logits[~batch.harmful], base_logits[~batch.harmful])
    assert not torch.allclose(logits[batch.harmful], base_logits[batch.harmful])


@pytest.mark.parametrize("ablation", ["one-direction", "random"])
def test_new_ablations_depend_on_seed_and_step_only_and_shards_agree(model, ablation):
    batch = collate(model, [PAIRS[i] for i in (0, 1, 2, 3, 8, 9, 10, 11)], 96)
    def sites(pert, b, d):
        if ablation == "one-direction":
            return pert.direction_layers(b, d), pert.direction_positions(b, d)
        return pert.random_sites(b, d)
    extra = {"positions": [-1, -2, -3]} if ablation == "one-direction" else {}
    pert, again, other = (_ready(model, seed=s, p=0.5, ablation=ablation, **extra) for s in (3, 3, 4))
    draws = [sites(pert, batch, d) for d in range(6)]
    assert all(all(torch.equal(x, y) for x, y in zip(sites(again, batch, d), draws[d])) for d in range(6))
    assert len({tuple(torch.cat([x.flatten().long() for x in d]).tolist()) for d in draws}) > 1  # vary with the step
    assert any(not all(torch.equal(x, y) for x, y in zip(sites(other, batch, d), draws[d])) for d in range(6))
    for rank in range(2):  # a data-parallel shard draws the global batch's sites for its rows
        rows = torch.arange(rank, 8, 2)
        shard = batch.select(rows)
        assert all(torch.equal(x, y[rows]) for d in range(6) for x, y in zip(sites(pert, shard, d), draws[d]))


# ---------------------------------------------------------------------------------------------
# 3. Features recomputed every k steps, from the model being trained


def test_refat_recomputes_directions_every_k_steps(tmp_path):
    r = run("refat", tmp_path / "run", lr=5e-2, schedule="constant", warmup_steps=0)
    s = summary(tmp_path / "run")
    hist = s["direction_history"]
    assert [h["step"] for h in hist] == [0, 2, 4]
    assert hist[0]["cosine_to_previous"] is None
    for h in hist[1:]:
        assert -1.0 <= h["cosine_to_previous"] < 1 - 1e-6
    assert all(h["mean_norm"] > 0 for h in hist)
    # 3 recomputations × (harmful, harmless) × (the shared chat-template prefix once + 1 batch of n=4 prompts)
    assert s["compute"]["perturbation"]["forward"] == 12 == r.compute["perturbation"]["forward"]
    assert s["compute"]["perturbation"]["tokens"] > 0
    assert [m["step"] for m in metrics(tmp_path / "run")] == list(range(6))



def test_feature_window_averages_the_last_recomputations_means():
    """window 2: the first recomputation runs all n prompts and fills the window; each later one runs the next
    n / 2 prompts of each kind of window 1's first shuffle and replaces the oldest means, so the features are the
    mean of the two, over n distinct prompts."""
    from refat.directions import extract
    from refat.training.perturbations import step_generator

    model = fresh()  # its weights move below
    g = step_generator(0, 0, 1)  # window 1's draw at step 0: harmful first, then harmless, from one generator
    orders = [torch.randperm(len(xs), generator=g).tolist() for xs in (HARMFUL, HARMLESS)]

    def means(start, count):  # the shuffle's prompts [start, start + count) of each kind, on the model as it is
        harmful, harmless = ([xs[o[i]] for i in range(start, start + count)]
                             for xs, o in zip((HARMFUL, HARMLESS), orders))
        d = extract(model, harmful, harmless, positions=[-1], progress=False)
        return d.harmful_mean[0], d.harmless_mean[0], harmful

    pert = RefatPerturbation(model, RefatConfig(n=4, k=2, window=2), HARMFUL, HARMLESS, seed=0)
    whole = RefatPerturbation(model, RefatConfig(n=4, k=2), HARMFUL, HARMLESS, seed=0)
    pert.recompute(0), whole.recompute(0)
    assert torch.equal(pert.directions, whole.directions)  # the first: all n, as window 1
    g2 = step_generator(0, 2, 1)  # window 1 draws n of each kind afresh at every recomputation
    assert whole._prompts(2) == tuple([xs[i] for i in torch.randperm(len(xs), generator=g2)[:4].tolist()]
                                      for xs in (HARMFUL, HARMLESS))
    h0, b0, _ = means(0, 4)
    first_tokens = pert.cost.tokens
    history = []
    for step, start in ((2, 4), (4, 6)):  # the shuffle after the first n: 2 prompts of each kind at each step
        with torch.no_grad():  # the model moves between recomputations, as in training
            for w in model.hf.parameters():
                w.add_(0.05 * torch.randn_like(w))
        pert.recompute(step)
        history.append(means(start, 2))
    assert 0 < (pert.cost.tokens - first_tokens) / 2 < first_tokens  # each: n / 2 prompts of each kind, not n
    (h2, b2, drawn2), (h4, b4, drawn4) = history
    assert len(set(drawn2 + drawn4)) == 4  # the window's prompts: n distinct ones
    # step 4: the means of steps 2 and 4 (step 0's left the window), each at the model as it was then
    assert (pert.directions - ((h2 + h4) / 2 - (b2 + b4) / 2).float()).abs().max().item() < 1e-5
    assert (pert.harmless_mean - ((b2 + b4) / 2).float()).abs().max().item() < 1e-5
    stale = ((h0 + h4) / 2 - (b0 + b4) / 2).float()
    assert (pert.directions - stale).abs().max().item() > 1e-3  # the window moved on

    again = RefatPerturbation(model, RefatConfig(n=4, k=2, window=2), HARMFUL, HARMLESS, seed=0)
    again.load_state(pert.state())  # a checkpoint carries the window: the next recomputation is the same
    pert.recompute(6), again.recompute(6)
    assert torch.equal(pert.directions, again.directions)

# ---------------------------------------------------------------------------------------------
# 4. Resume


def _assert_same_run(a: Path, b: Path, ra, rb):
    assert max_diff(adapter(a), adapter(b)) <= 1e-6
    assert max_diff(trainable(ra.model), trainable(rb.model)) <= 1e-6
    ma, mb = metrics(a), metrics(b)
    assert [m["step"] for m in mb] == [m["step"] for m in ma]
    for x, y in zip(ma, mb):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-6)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-9)
    sa, sb = summary(a), summary(b)
    assert sb["final_loss"] == pytest.approx(sa["final_loss"], abs=1e-6)
    assert rb.final_loss == pytest.approx(ra.final_loss, abs=1e-6)
    assert [h["step"] for h in sb["direction_history"]] == [h["step"] for h in sa["direction_history"]]
    for x, y in zip(sa["direction_history"], sb["direction_history"]):
        assert (x["cosine_to_previous"] is None) == (y["cosine_to_previous"] is None)
        if x["cosine_to_previous"] is not None:
            assert x["cosine_to_previous"] == pytest.approx(y["cosine_to_previous"], abs=1e-6)
    ca, cb = sa["compute"], sb["compute"]
    for key in ("train_forward", "train_backward", "train_tokens", "train_target_tokens"):
        assert ca[key] == cb[key], key
    assert 0 < ca["train_target_tokens"] < ca["train_tokens"]
    for key in ("forward", "backward", "tokens"):
        assert ca["perturbation"][key] == cb["perturbation"][key], f"perturbation {key}"


@pytest.mark.parametrize("method", ["refat", "rt"])
def test_resume_extended_run_matches_uninterrupted(tmp_path, method):
    a, b = tmp_path / "a", tmp_path / "b"
    ra = run(method, a, checkpoint_every=2, lr=2e-2)
    run(method, b, checkpoint_every=2, lr=2e-2, steps=4)
    assert (b / "train_summary.json").exists()
    rb = run(method, b, checkpoint_every=2, lr=2e-2, resume=True)
    assert summary(b)["steps"] == 6
    assert sorted(p.name for p in (b / "checkpoints").iterdir()) == ["step-000002", "step-000004", "step-000006"]
    _assert_same_run(a, b, ra, rb)


class Crash(Exception):
    pass


@pytest.mark.parametrize("method, refat", [("refat", {}), ("refat", {"window": 2, "ablation": "one-direction",
                                                                      "positions": [-1, -2]}), ("rt", {})])
def test_resume_after_crash_matches_uninterrupted(tmp_path, monkeypatch, method, refat):
    a, b = tmp_path / "a", tmp_path / "b"
    # k=3: features computed at steps 0 and 3, so the run resumed at step 2 must use the checkpoint's features
    # (and the checkpoint's window of means, and the features at every drawn position)
    kw = {"checkpoint_every": 2, "lr": 2e-2, "refat": RefatConfig(n=4, k=3, **refat)}
    ra = run(method, a, **kw)

    real_pairs = trainer_mod._Sampler.pairs

    def crashing(self, draw):
        if draw == 3:
            raise Crash("killed at step 3")
        return real_pairs(self, draw)

    with monkeypatch.context() as m:
        m.setattr(trainer_mod._Sampler, "pairs", crashing)
        with pytest.raises(Crash):
            run(method, b, **kw)
    assert not (b / "train_summary.json").exists()
    assert [p.name for p in (b / "checkpoints").iterdir()] == ["step-000002"]
    assert [r["step"] for r in metrics(b)] == [0, 1, 2]
    with pytest.raises(FinishedRunError, match="resume"):  # checkpoints of an earlier run: not silently restarted
        run(method, b, **kw)
    rb = run(method, b, resume=True, **kw)
    _assert_same_run(a, b, ra, rb)


def test_resume_with_more_steps_follows_new_schedule(tmp_path):
    """Extending a finished linear-decay run: its first resumed step trains with the new schedule's lr,
    not the old schedule's final lr of 0."""
    out = tmp_path / "run"
    run("rt", out, steps=4, checkpoint_every=1, lr=2e-2, schedule="linear", warmup_steps=0)
    run("rt", out, steps=6, checkpoint_every=1, lr=2e-2, schedule="linear", warmup_steps=0, resume=True)
    w4 = load_file(str(out / "checkpoints" / "step-000004" / "trainable.safetensors"))
    w5 = load_file(str(out / "checkpoints" / "step-000005" / "trainable.safetensors"))
    assert max_diff(w4, w5) > 1e-6
    state = torch.load(out / "checkpoints" / "step-000005" / "state.pt", weights_only=True)
    # after step 4 of 6 the linear schedule is at 1 - 5/6 for step 5
    assert state["optimizer"]["param_groups"][0]["lr"] == pytest.approx(2e-2 / 6)


def test_resume_refuses_a_different_config(tmp_path):
    out = tmp_path / "run"
    run("rt", out, steps=2, checkpoint_every=1)
    with pytest.raises(ValueError, match="different training config"):
        run("rt", out, steps=4, checkpoint_every=1, lr=1e-3, resume=True)


# ---------------------------------------------------------------------------------------------
# 5. Divergence


def test_nan_loss_stops_with_clear_error_and_keeps_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_ce = torch.nn.functional.cross_entropy
    calls = []

    def ce(*args, **kwargs):
        loss = real_ce(*args, **kwargs)
        calls.append(kwargs.get("reduction"))
        return loss * float("nan") if len(calls) == 4 else loss  # the training loss of step 3

    with monkeypatch.context() as m:
        m.setattr(trainer_mod.torch.nn.functional, "cross_entropy", ce)
        with pytest.raises(TrainingDivergedError) as err:
            run("refat", out, checkpoint_every=2)
    assert calls == ["sum"] * 4
    msg = str(err.value)
    assert "step 3" in msg and "nan" in msg.lower()
    ckpt = out / "checkpoints" / "step-000002"
    assert str(ckpt) in msg
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-000002"]
    assert not (out / "train_summary.json").exists()
    # the checkpoint is intact: it loads, and training resumes from it
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == 2
    weights = load_file(str(ckpt / "trainable.safetensors"))
    assert weights and all(torch.isfinite(t).all() for t in weights.values())
    torch.load(ckpt / "state.pt", weights_only=True)
    r = run("refat", out, checkpoint_every=2, resume=True)
    assert r.final_loss == r.final_loss and summary(out)["steps"] == 6


def test_exploding_lr_raises_diverged(tmp_path):
    with pytest.raises(TrainingDivergedError, match=r"at step \d+.*Last good checkpoint"):
        run("rt", tmp_path / "run", lr=1e30, warmup_steps=0, max_grad_norm=1e30, schedule="constant")


# ---------------------------------------------------------------------------------------------
# 6. Bad input


@pytest.mark.parametrize("kwargs, match", [
    ({"method": "sft"}, r"rt, refat, cat, lat"),
    ({"refat": partial(RefatConfig, layers=[4])}, r"out of range"),
    ({"refat": partial(RefatConfig, layers=[-1])}, r"out of range"),
    ({"refat": partial(RefatConfig, p=1.5)}, r"\[0, 1\]"),
    ({"refat": partial(RefatConfig, p=-0.1)}, r"\[0, 1\]"),
    ({"refat": partial(RefatConfig, n=4, window=3)}, r"window.*divide n"),
    ({"refat": partial(RefatConfig, ablation="random", positions=[-2])}, r"positions.*per-layer and one-direction"),
    ({"refat": partial(RefatConfig, ablation="one-direction", positions=[0])}, r"positions.*negative"),
    ({"method": "lat", "adversarial": partial(AdversarialConfig, layers=[7])}, r"out of range"),
    ({"method": "cat", "adversarial": partial(AdversarialConfig, step_size=0.0)}, r"step_size"),
    ({"batch_size": 1}, r"batch_size"),
])
def test_bad_config_raises_before_writing(tmp_path, kwargs, match):
    method = kwargs.pop("method", "refat")
    with pytest.raises(ValueError, match=match):  # sub-configs built here: some are refused on construction
        kwargs = {k: v() if callable(v) else v for k, v in kwargs.items()}
        train(fresh(), PAIRS, make_cfg(method, **kwargs), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("keep", [True, False])
def test_pairs_need_both_kinds(tmp_path, keep):
    pairs = [p for p in PAIRS if p.harmful == keep]
    with pytest.raises(ValueError, match="harmful"):
        train(fresh(), pairs, make_cfg("rt"), tmp_path / "run", progress=False)
    assert not (tmp_path / "run").exists()


def test_finished_run_is_protected(tmp_path):
    out = tmp_path / "run"
    first = run("rt", out, steps=2)
    before = adapter(out)
    with pytest.raises(FinishedRunError, match="finished"):
        run("rt", out, steps=2)
    # bad input with overwrite must not destroy the finished run
    with pytest.raises(ValueError):
        train(fresh(), [p for p in PAIRS if not p.harmful], make_cfg("rt", steps=2), out, overwrite=True,
              progress=False)
    assert (out / "train_summary.json").exists() and max_diff(adapter(out), before) == 0
    # resume of a finished run: nothing left to train, the summary keeps its final loss
    again = run("rt", out, steps=2, resume=True)
    assert max_diff(adapter(out), before) == 0
    assert again.final_loss == pytest.approx(first.final_loss)
    assert summary(out)["final_loss"] == pytest.approx(first.final_loss)
    # overwrite: a new run from scratch (a different seed gives different weights)
    run("rt", out, steps=2, seed=1, overwrite=True)
    assert max_diff(adapter(out), before) > 0
    assert [m["step"] for m in metrics(out)] == [0, 1]


# ---------------------------------------------------------------------------------------------
# 7. CAT and LAT attacks


@pytest.mark.parametrize("method", ["cat", "lat"])
def test_adversarial_attack_budget_positions_and_effect(model, method):
    pairs = [PAIRS[0], PAIRS[8], PAIRS[2], PAIRS[9]]  # harmful prompts of different lengths
    batch = collate(model, pairs, 96, with_affirmative=True)
    cfg = AdversarialConfig(epsilon=0.1, steps=4)
    pert = AdversarialPerturbation(model, cfg, method)
    assert pert.layers == ([0] if method == "cat" else [1, 2, 3])
    deltas = pert._attack(batch)
    lengths = batch.prompt_lengths[batch.harmful]
    assert lengths[0] != lengths[1]
    width = int(lengths.max())
    with hooks.capture(model, pert.layers, positions=slice(0, width)) as acts, torch.no_grad():
        model.hf(input_ids=batch.affirm.input_ids, attention_mask=batch.affirm.attention_mask)
    for l, d in deltas.items():
        assert d.shape == (2, width, model.d_model)
        prompt = torch.arange(width)[None] < lengths[:, None]  # the budget is relative to real prompt tokens
        eps = cfg.epsilon * acts[l][0].norm(dim=-1)[prompt].median().item()
        norms = d.norm(dim=-1)
        assert (norms <= eps + 1e-5).all()
        assert norms.max() > 0.5 * eps  # the attack uses its budget
        for i, n in enumerate(lengths.tolist()):
            assert norms[i, :n].gt(0).all(), "every prompt token is attacked"
            assert norms[i, n:].eq(0).all(), "nothing beyond the prompt"

    def target_loss(d=None):
        from contextlib import nullcontext
        with torch.no_grad(), (hooks.perturb(model, d) if d else nullcontext()):
            return response_loss(model, batch.affirm.input_ids, batch.affirm.attention_mask, batch.affirm.labels,
                                 reduction="mean").item()

    clean, attacked = target_loss(), target_loss(deltas)
    assert attacked < clean - 1e-2
    # more PGD steps within the same budget make a stronger attack, not a weaker one
    one_step = target_loss(AdversarialPerturbation(model, AdversarialConfig(epsilon=0.1, steps=1), method)._attack(batch))
    assert attacked < one_step

    # in the training forward, the perturbation lands only on harmful rows' prompt positions
    first = min(pert.layers)
    base, _ = _forward_capture(model, batch)
    pert2 = AdversarialPerturbation(model, cfg, method)
    hit, _ = _forward_capture(model, batch, pert2.context(batch, 0))
    diff = (hit[first] - base[first]).norm(dim=-1)
    allowed = torch.zeros_like(diff, dtype=torch.bool)
    for i in batch.harmful.nonzero().flatten().tolist():
        allowed[i, :batch.prompt_lengths[i]] = True
    assert diff[~allowed].eq(0).all()
    assert diff[allowed].gt(0).all()
    for l in range(first):
        assert torch.equal(hit[l], base[l])


# ---------------------------------------------------------------------------------------------
# 8. Data parallel


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# label -> (method, TrainConfig changes): each ReFAT ablation, every harmful row ablated at its own drawn sites
DP_RUNS = {"refat": ("refat", {}), "rt": ("rt", {}),
           "refat-one-direction": ("refat", {"refat": RefatConfig(n=4, k=2, p=1.0, ablation="one-direction", window=2,
                                                                  positions=[-1, -2])}),
           "refat-random": ("refat", {"refat": RefatConfig(n=4, k=2, p=1.0, ablation="random")}),
           # the authors' CAT and LAT (balls in fixed units): each shard's attack averages over the global batch's
           # tokens; the objective's terms over the global batch, floors and the KL's normaliser decided on global
           # values (cat-paper: one harmful row in four, so rank 1 holds none: no attack and no away term there).
           # The default CAT/LAT are left out: their ball is measured on each shard's own prompt tokens
           "cat-paper": ("cat", {"harmful_share": 0.25, "adversarial": preset_config("cat-paper", adversarial={
               "steps": 2}).adversarial}),
           "lat-paper": ("lat", {"adversarial": preset_config("lat-paper", adversarial={"steps": 2}).adversarial})}


def _dp_worker(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group (a forked child: torch, transformers and peft are already imported)."""
    try:
        os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="")
        torch.set_num_threads(1)
        from accelerate.state import AcceleratorState  # the parent's (single-process) state came with the fork
        AcceleratorState._reset_state(reset_partial_state=True)
        for method, (name, kw) in DP_RUNS.items():
            r = run(name, f"{out}/{method}", steps=3, batch_size=4, lr=2e-2, **kw)  # the same out_dir on both ranks
            save_file({n: t.contiguous() for n, t in trainable(r.model).items()}, f"{out}/{method}-rank{rank}.safetensors")
            Path(f"{out}/{method}-rank{rank}.loss").write_text(repr(r.final_loss))
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        Path(f"{out}/error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def _run_ranks(worker, out: Path, timeout: float) -> None:
    """``worker(rank, port, out)`` in 2 forked processes; fails with the ranks' tracebacks (error-rank*.txt)."""
    out.mkdir()
    ctx = multiprocessing.get_context("fork")
    port = _free_port()
    procs = [ctx.Process(target=worker, args=(rank, port, str(out))) for rank in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(timeout=timeout)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
                p.join()
    errors = "\n".join(e.read_text() for e in sorted(out.glob("error-rank*.txt")))
    assert [p.exitcode for p in procs] == [0, 0], errors or "a rank hung or was killed"


def test_data_parallel_matches_single_process(tmp_path):
    out = tmp_path / "dp"
    _run_ranks(_dp_worker, out, timeout=120)

    for method, (name, kw) in DP_RUNS.items():
        w0 = load_file(str(out / f"{method}-rank0.safetensors"))
        w1 = load_file(str(out / f"{method}-rank1.safetensors"))
        assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0), method
        single = run(name, tmp_path / f"single-{method}", steps=3, batch_size=4, lr=2e-2, **kw)
        ws = trainable(single.model)
        assert max_diff(ws, w0) <= 1e-5, method
        assert max(v.abs().max().item() for k, v in ws.items() if "lora_B" in k) > 1e-4  # weights did move
        # only rank 0 wrote the run directory; its adapter is the trained weights
        assert (out / method / "train_summary.json").exists()
        assert summary(out / method)["final_loss"] == pytest.approx(single.final_loss, abs=1e-5)
        assert float((out / f"{method}-rank0.loss").read_text()) == pytest.approx(single.final_loss, abs=1e-5)
        assert float((out / f"{method}-rank1.loss").read_text()) == pytest.approx(single.final_loss, abs=1e-5)
        dp_rows, single_rows = metrics(out / method), metrics(tmp_path / f"single-{method}")
        assert [m["step"] for m in dp_rows] == [0, 1, 2]
        for x, y in zip(dp_rows, single_rows):  # the same loss and the same gradient (Adam would hide a scale)
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4)
        sa = adapter(out / method)
        sb = adapter(tmp_path / f"single-{method}")
        assert max_diff(sa, sb) <= 1e-5


# ---------------------------------------------------------------------------------------------
# 8b. Sharded full fine-tuning (FSDP2 through accelerate) on 2 CPU processes

FSDP_CONFIG = Path(__file__).parents[1] / "configs" / "accelerate" / "fsdp.yaml"
# label -> (method, TrainConfig changes): full fine-tuning; ReFAT ablates every harmful row (its hooks must fire)
FSDP_RUNS = {"rt": ("rt", {}), "refat": ("refat", {"refat": RefatConfig(n=4, k=2, p=1.0)})}
FSDP_KW = {"full_finetune": True, "steps": 3, "batch_size": 4, "lr": 1e-3, "checkpoint_every": 2}


def _launch_env(config: Path, processes: int) -> dict[str, str]:
    """The environment ``accelerate launch --config_file config`` gives each process (accelerate's own
    translation of the file: the shipped config is what is tested)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "--num_processes", str(processes),
                                               "-m", "refat.cli"])
    env = prepare_multi_gpu_env(_validate_launch_command(args)[0])
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


def _shard_on_cpu() -> None:
    """Make accelerate shard CPU processes. accelerate 1.15 sets FSDP up only for GPU processes (AcceleratorState
    takes ACCELERATE_USE_FSDP for MULTI_GPU and its kin, never MULTI_CPU) while torch's fully_shard runs on gloo;
    so once accelerate has set up this process, its state becomes FSDP with the plugin accelerate reads from
    the environment, as on a GPU. Everything after (prepare, clip, checkpoints, state dicts) is accelerate's."""
    import accelerate
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    class ShardingAccelerator(accelerate.Accelerator):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # read back by every AcceleratorState()
            self.state.distributed_type = DistributedType.FSDP
            self.state.fsdp_plugin = FullyShardedDataParallelPlugin()

    accelerate.Accelerator = ShardingAccelerator


def _fsdp_worker(rank: int, port: int, out: str) -> None:
    """One rank of a 2-process gloo group running the trainer sharded: each run, then a run extended by resuming."""
    try:
        os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port), CUDA_VISIBLE_DEVICES="", **_launch_env(FSDP_CONFIG, 2))
        torch.set_num_threads(1)
        from accelerate.state import AcceleratorState
        AcceleratorState._reset_state(reset_partial_state=True)
        _shard_on_cpu()
        for label, (method, kw) in FSDP_RUNS.items():
            r = run(method, f"{out}/{label}", **FSDP_KW, **kw)
            blocks = r.model.blocks
            Path(f"{out}/{label}-rank{rank}.json").write_text(json.dumps({
                "loss": r.final_loss, "blocks": [type(b).__name__ for b in blocks],
                "shard": [list(next(blocks[0].parameters()).to_local().shape), list(next(blocks[0].parameters()).shape)]}))
        run("refat", f"{out}/resumed", **FSDP_KW | {"steps": 2}, **FSDP_RUNS["refat"][1])
        run("refat", f"{out}/resumed", **FSDP_KW | {"steps": 4}, **FSDP_RUNS["refat"][1], resume=True)
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    except BaseException:
        Path(f"{out}/error-rank{rank}.txt").write_text(traceback.format_exc())
        raise


def _saved_model(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "model" / "model.safetensors"))


def test_fsdp_full_finetune_matches_single_process_and_resumes(tmp_path):
    """accelerate's FSDP2 (from the shipped configs/accelerate/fsdp.yaml) on 2 CPU processes: each decoder
    block is sharded, ReFAT's hooks and feature recomputation run on the sharded model, every step's loss
    and gradient norm and the saved model equal one unsharded process's, checkpoints are written as
    shards, and a run resumed from them equals an uninterrupted one."""
    out = tmp_path / "fsdp"
    _run_ranks(_fsdp_worker, out, timeout=300)

    base = {n: p.detach() for n, p in fresh().hf.state_dict().items()}
    singles = {}
    for label, (method, kw) in FSDP_RUNS.items():
        ranks = [json.loads((out / f"{label}-rank{r}.json").read_text()) for r in range(2)]
        assert all(r["blocks"] == ["FSDPLlamaDecoderLayer"] * 4 for r in ranks), label  # sharded in place
        local, whole = ranks[0]["shard"]
        assert local == [whole[0] // 2, *whole[1:]]  # each rank holds half of each weight (rows), not all of it
        single = run(method, tmp_path / f"single-{label}", **FSDP_KW, **kw)
        singles[label] = metrics(tmp_path / f"single-{label}")
        for r in ranks:
            assert r["loss"] == pytest.approx(single.final_loss, abs=1e-5), label
        sharded, plain = metrics(out / label), singles[label]
        assert [m["step"] for m in sharded] == [0, 1, 2]
        for x, y in zip(sharded, plain):
            assert x["loss"] == pytest.approx(y["loss"], abs=1e-5), label
            assert x["grad_norm"] == pytest.approx(y["grad_norm"], rel=1e-4), label
        ws, wp = _saved_model(out / label), _saved_model(tmp_path / f"single-{label}")
        assert max_diff(ws, wp) <= 1e-5, label
        assert max_diff({k: ws[k] for k in base if k in ws}, base) > 1e-4  # every weight trained: they moved
        assert all(v.dtype == torch.float32 for v in ws.values())
        hs, hp = summary(out / label)["direction_history"], summary(tmp_path / f"single-{label}")["direction_history"]
        assert [h["step"] for h in hs] == [h["step"] for h in hp] == ([0, 2] if method == "refat" else [])
        for x, y in zip(hs, hp):  # the features recomputed from the sharded model are the unsharded model's
            assert x["mean_norm"] == pytest.approx(y["mean_norm"], rel=1e-5)
            assert (x["cosine_to_previous"] is None) == (y["cosine_to_previous"] is None)
            assert (x["cosine_to_previous"] or 0) == pytest.approx(y["cosine_to_previous"] or 0, abs=1e-5)
    # the ablation changes the training, so equal ReFAT losses mean its hooks fired on the sharded blocks
    assert abs(singles["refat"][0]["loss"] - singles["rt"][0]["loss"]) > 1e-3

    ckpt = out / "refat" / "checkpoints" / "step-000002"
    shards = sorted(p.name for p in (ckpt / "fsdp").rglob("*.distcp"))
    assert len(shards) >= 4 and not (ckpt / "trainable.safetensors").exists()  # model and optimizer, per rank
    assert "optimizer" not in torch.load(ckpt / "state.pt", weights_only=True)
    # 2 steps, then 2 more resumed from the sharded checkpoint = 4 steps of one process
    whole = run("refat", tmp_path / "single-4", **FSDP_KW | {"steps": 4}, **FSDP_RUNS["refat"][1])
    resumed = metrics(out / "resumed")
    assert [m["step"] for m in resumed] == [0, 1, 2, 3]
    for x, y in zip(resumed, metrics(tmp_path / "single-4")):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5)
        assert x["lr"] == pytest.approx(y["lr"], rel=1e-9)
    assert summary(out / "resumed")["final_loss"] == pytest.approx(whole.final_loss, abs=1e-5)
    assert max_diff(_saved_model(out / "resumed"), _saved_model(tmp_path / "single-4")) <= 1e-5


def test_fsdp_asked_but_not_set_up_is_refused(tmp_path, monkeypatch):
    """accelerate does not shard a CPU process (nor one not started by accelerate launch): the run stops
    rather than train unsharded under an FSDP config."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    with pytest.raises(ValueError, match="asks for FSDP .* but accelerate set up NO"):
        run("rt", tmp_path / "run", full_finetune=True, steps=1)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_fsdp_refuses_fsdp1_lora_and_a_process_without_a_harmful_row():
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from refat.training import fsdp

    def acc(version: int = 2):
        return SimpleNamespace(distributed_type=DistributedType.FSDP,
                               state=SimpleNamespace(fsdp_plugin=SimpleNamespace(fsdp_version=version)))

    full = make_cfg("cat", full_finetune=True, batch_size=7)
    fsdp.check(acc(), full, world=4)  # 4 harmful rows: one per process
    with pytest.raises(ValueError, match="fsdp_version: 2"):
        fsdp.check(acc(1), full, world=4)
    with pytest.raises(ValueError, match="--full-finetune"):
        fsdp.check(acc(), make_cfg("refat"), world=2)
    with pytest.raises(ValueError, match="--batch-size >= 9"):
        fsdp.check(acc(), full, world=5)
    fsdp.check(acc(), dataclasses.replace(full, method="refat"), world=5)  # ReFAT's hooks run no forward of their own
    fsdp.check(SimpleNamespace(distributed_type=DistributedType.MULTI_GPU), make_cfg("refat"), world=5)  # DDP: no check


def test_sharded_checkpoint_is_not_resumed_unsharded(tmp_path):
    out = tmp_path / "run"
    run("rt", out, full_finetune=True, steps=2, checkpoint_every=1)
    (out / "checkpoints" / "step-000002" / "fsdp").mkdir()  # as a sharded run writes it
    with pytest.raises(InputError, match="written by a sharded run and this one is not sharded"):
        run("rt", out, full_finetune=True, steps=3, checkpoint_every=1, resume=True)


# ---------------------------------------------------------------------------------------------
# 9. Through accelerate: gradient accumulation, gradient checkpointing, trackers, mixed precision


def test_gradient_accumulation_averages_the_micro_batches(tmp_path):
    """One step over two micro-batches: the gradient is the mean of the two micro-batches' gradients
    (accelerate divides by grad_accum once, not twice, and skips no micro-batch)."""
    cfg = make_cfg("rt", steps=1, grad_accum=2, max_grad_norm=1e9)
    r = train(fresh(), PAIRS, cfg, tmp_path / "ga", progress=False)
    base = fresh()
    torch.manual_seed(cfg.seed)  # as train does: the LoRA initialisation
    model = trainer_mod._prepare_model(base, cfg)
    sampler = trainer_mod._Sampler(PAIRS, cfg)
    for draw in (0, 1):
        b = collate(model, sampler.pairs(draw), cfg.max_length)
        (response_loss(model, b.input_ids, b.attention_mask, b.labels) / int(b.labels[:, 1:].ne(-100).sum()) / 2).backward()
    expected = torch.nn.utils.clip_grad_norm_([p for p in model.hf.parameters() if p.requires_grad], 1e9).item()
    assert metrics(tmp_path / "ga")[0]["grad_norm"] == pytest.approx(expected, rel=1e-5)
    assert r.compute["train_forward"] == 2


def test_gradient_checkpointing_changes_no_number(tmp_path):
    """Recomputed activations (the RFA hooks fire again in the recomputation) give the same training."""
    plain = run("refat", tmp_path / "plain", steps=3, lr=2e-2)
    ckpt = run("refat", tmp_path / "ckpt", steps=3, lr=2e-2, gradient_checkpointing=True)
    assert all(b.gradient_checkpointing for b in ckpt.model.blocks) and not plain.model.blocks[0].gradient_checkpointing
    assert max_diff(adapter(tmp_path / "plain"), adapter(tmp_path / "ckpt")) <= 1e-6
    assert plain.final_loss == pytest.approx(ckpt.final_loss, abs=1e-6)
    assert make_cfg(gradient_checkpointing=True).fingerprint() == make_cfg().fingerprint()  # resumable either way


def test_new_options_keep_earlier_checkpoints_resumable():
    """The fingerprint of a config that trains as before the accelerate options existed is the old one."""
    import hashlib

    cfg = make_cfg().resolved(torch.device("cpu"))
    assert cfg.mixed_precision == "no"
    later = {"harmful_share"}  # configs.added fields, left out at their defaults
    skipped = later | {"steps", "checkpoint_every", "merge", "mixed_precision", "gradient_checkpointing", "report_to"}
    old = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in skipped}
    old["adversarial"] = {k: old["adversarial"][k] for k in ("layers", "epsilon", "steps", "step_size", "away_weight")}
    old["refat"] = {k: v for k, v in old["refat"].items() if k not in ("window", "positions")}  # added later
    assert cfg.fingerprint() == hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()[:16]
    assert cfg.fingerprint() == "87441ab926633917"  # computed before the CAT/LAT paper options existed (edfe63e)
    assert dataclasses.replace(cfg, mixed_precision="bf16").fingerprint() != cfg.fingerprint()
    assert dataclasses.replace(cfg, harmful_share=0.125).fingerprint() != cfg.fingerprint()
    adv = dataclasses.replace(cfg.adversarial, scale="absolute")
    assert dataclasses.replace(cfg, adversarial=adv).fingerprint() != cfg.fingerprint()
    for change in ({"window": 2}, {"positions": [-1, -2]}):
        refat = dataclasses.replace(cfg.refat, **change)
        assert dataclasses.replace(cfg, refat=refat).fingerprint() != cfg.fingerprint()


def test_mixed_precision_auto_resolves_per_device(monkeypatch):
    assert make_cfg().resolved(torch.device("cpu")).mixed_precision == "no"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert make_cfg().resolved(torch.device("cuda", 1)).mixed_precision == "bf16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert make_cfg().resolved(torch.device("cuda", 0)).mixed_precision == "fp16"
    assert make_cfg(mixed_precision="no").resolved(torch.device("cuda", 0)).mixed_precision == "no"


def test_report_to_is_checked():
    assert make_cfg(report_to=["none"]).report_to == []
    with pytest.raises(ValueError, match="report_to: unknown tracker"):
        make_cfg(report_to=["tensorbored"])


def test_tensorboard_gets_the_loss_curve_drift_and_counters(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is in the test extra")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run("refat", tmp_path / "tb", steps=4, report_to=["tensorboard"])
    events = list((tmp_path / "tb" / "trackers").rglob("events.out.tfevents.*"))
    assert events, "no TensorBoard event file"
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    rows = metrics(tmp_path / "tb")
    assert [e.step for e in acc.Scalars("loss")] == [0, 1, 2, 3]
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([r["loss"] for r in rows], rel=1e-6)
    # ReFAT recomputes its features every k=2 steps: the drift is logged at those steps, in metrics.jsonl too
    assert [e.step for e in acc.Scalars("feature_cosine")] == [2] and "feature_cosine" in rows[2]
    assert [e.step for e in acc.Scalars("feature_norm")] == [0, 2]
    tokens = [e.value for e in acc.Scalars("compute/train_tokens")]
    assert tokens == sorted(tokens) and tokens[0] > 0
    assert [e.value for e in acc.Scalars("compute/perturbation_forward")][-1] > 0


def test_lat_default_layers_are_distinct_on_a_shallow_model():
    """[L/4, L/2, 3L/4] repeats a layer when L is 2 or 3; the inner attack then zipped mismatched lists."""
    shallow = build_model("llama", layers=2, hidden=32, dtype=torch.float32)
    assert AdversarialPerturbation(shallow, AdversarialConfig(), "lat").layers == [0, 1]
    deep = build_model("llama", layers=8, hidden=32, dtype=torch.float32)
    assert AdversarialPerturbation(deep, AdversarialConfig(), "lat").layers == [2, 4, 6]
