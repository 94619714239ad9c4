"""CAT and LAT as their authors define them (refat.training.presets): the unlikelihood and floored losses, the
fields left out of fingerprints until set, the presets' values and layers, the attacks' balls, steps and
positions, the per-term training objective (each term's value, the floors' slopes, the away term's direction,
the KL to the base model), CAT's batch mix, training end to end and a preset from an experiment config.

Every model is a tiny random Llama (4 layers, d=32, float32).
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import replace

import pytest
import torch
from test_training import PAIRS, _single_process, fresh, metrics  # noqa: F401 (an autouse fixture)

from refat import hooks
from refat.configs import ConfigError, fingerprint_data
from refat.losses import floored, unlikelihood
from refat.pipeline import ExperimentConfig
from refat.training import AdversarialConfig, TrainConfig, train
from refat.training import trainer as trainer_mod
from refat.training.data import collate, response_logits, response_loss
from refat.training.objective import objective_loss, term_tokens
from refat.training.perturbations import AdversarialPerturbation
from refat.training.presets import preset, preset_config

BATCH = [PAIRS[0], PAIRS[8], PAIRS[2], PAIRS[9]]  # harmful prompts of different lengths, two harmless rows
CAT = preset_config("cat-paper").adversarial
LAT = preset_config("lat-paper").adversarial


@pytest.fixture(scope="module")
def model():
    """A shared tiny model for tests that never change its weights."""
    return fresh()


def batch_of(model, pairs=BATCH):
    return collate(model, pairs, 96, with_affirmative=True)


def mean_ce(model, ids, mask, labels, deltas=None) -> float:
    with torch.no_grad(), (hooks.perturb(model, deltas) if deltas else nullcontext()):
        return response_loss(model, ids, mask, labels, reduction="mean").item()


def objective(model, batch, cfg, method="cat"):
    pert = AdversarialPerturbation(model, cfg, method)
    return (pert, *objective_loss(model, None, batch, pert, cfg, term_tokens(batch), 1, 0, nullcontext))


# ---------------------------------------------------------------------------------------------
# 1. The losses


def test_unlikelihood_is_minus_log_one_minus_p_and_descending_it_lowers_p():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11, dtype=torch.float64, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100
    scored = labels != -100

    def probs(x):
        return x.softmax(-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0][scored]

    p = probs(logits).detach()
    want = -(1 - p).log()
    assert torch.allclose(unlikelihood(logits, labels, reduction="none")[scored], want)
    assert unlikelihood(logits, labels).item() == pytest.approx(want.mean().item())
    # a threshold drops tokens already unlikely; they stay in the mean's denominator (HarmBench, LAT)
    threshold = p.log().median().item()
    kept = p.log() >= threshold
    assert 0 < kept.sum() < len(p)
    assert unlikelihood(logits, labels, threshold).item() == pytest.approx((want * kept).sum().item() / len(p))
    unlikelihood(logits, labels).backward()
    assert (probs(logits.detach() - 0.1 * logits.grad) < p).all()  # its descent pushes every label away
    certain = torch.tensor([[[1000.0, 0.0, 0.0]]])  # p rounds to 1: still finite
    assert unlikelihood(certain, torch.tensor([[0]])).item() == pytest.approx(1000 - math.log(2))


def test_floored_keeps_a_thousandth_of_the_slope_below_the_floor():
    x = torch.tensor(0.2, requires_grad=True)
    y = floored(x, 0.5)
    y.backward()
    assert y.item() == pytest.approx(0.5 + 1e-3 * 0.2) and x.grad.item() == pytest.approx(1e-3)
    above = torch.tensor(0.7)
    assert floored(above, 0.5) is above and floored(x, None) is x


# ---------------------------------------------------------------------------------------------
# 2. Config: fingerprints, presets, layers


def test_later_fields_stay_out_of_fingerprints_until_set():
    old_adversarial = {"layers", "epsilon", "steps", "step_size", "away_weight"}
    data = fingerprint_data(TrainConfig(method="cat"))
    assert "harmful_share" not in data and set(data["adversarial"]) == old_adversarial
    data = fingerprint_data(TrainConfig(method="cat", harmful_share=0.125,
                                        adversarial=AdversarialConfig(scale="absolute")))
    assert data["harmful_share"] == 0.125 and set(data["adversarial"]) == old_adversarial | {"scale"}
    assert preset_config("cat-paper").fingerprint() != TrainConfig(method="cat").fingerprint()


def test_presets_hold_the_published_settings():
    cat = preset_config("cat-paper")
    assert cat.method == "cat" and cat.harmful_share == 0.125
    assert (CAT.layers, CAT.scale, CAT.epsilon, CAT.steps, CAT.optimizer, CAT.lr, CAT.away_weight) == \
        ([0], "embedding-mean", 0.05, 10, "sign", 1e-4, 0.0)
    assert (CAT.toward_weight, CAT.toward_cutoff, CAT.train_away_weight, CAT.utility_weight, CAT.away_loss,
            CAT.away_cutoff) == (0.5, 0.5, 0.5, 1.0, "negative-ce", -5.0)
    assert preset_config("lat-paper").method == "lat"
    assert (LAT.scale, LAT.epsilon, LAT.steps, LAT.optimizer, LAT.lr, LAT.attack_completions, LAT.away_loss,
            LAT.away_cutoff) == ("absolute", 6.0, 16, "adamw", 1e-3, True, "unlikelihood", -5.0)
    # def_loss_coefs {kl: 0.1, toward: 0.5, away: 0.5} normalised to sum 1, no SFT term
    assert LAT.toward_weight + LAT.train_away_weight + LAT.kl_weight == pytest.approx(1.0)
    assert LAT.kl_weight == pytest.approx(0.1 / 1.1) and LAT.utility_weight == 0.0
    # changes on top of a preset keep its other values; the presets are copies
    changed = preset_config("lat-paper", adversarial={"steps": 2}, steps=3)
    assert (changed.adversarial.steps, changed.adversarial.epsilon, changed.steps) == (2, 6.0, 3)
    preset("cat-paper")["adversarial"]["steps"] = 99
    assert preset("cat-paper")["adversarial"]["steps"] == 10
    with pytest.raises(ConfigError, match="unknown preset 'cat'; choose from cat-paper, lat-paper"):
        preset("cat")


def test_lat_paper_layers_are_the_embeddings_and_four_residuals_rescaled_by_depth():
    # Llama-3-8B: "embedding" and the outputs of layers 8, 16, 24, 30 (the inputs of blocks 9, 17, 25, 31)
    assert LAT.resolved_layers(32, "lat") == [0, 9, 17, 25, 31]
    assert LAT.resolved_layers(24, "lat") == [0, 7, 13, 19, 23]  # Qwen2.5-0.5B
    assert LAT.resolved_layers(4, "lat") == [0, 1, 2, 3]
    assert AdversarialConfig().resolved_layers(24, "lat") == [6, 12, 18]  # today's default, unchanged
    with pytest.raises(ConfigError, match="layers.*out of range for layers_depth 8"):
        AdversarialConfig(layers=[0, 8], layers_depth=8)
    with pytest.raises(ConfigError, match="scale: embedding-mean .* layer 0 only"):
        AdversarialConfig(scale="embedding-mean").resolved_layers(24, "lat")
    with pytest.raises(ConfigError, match="step_size: set lr or step_size, not both"):
        AdversarialConfig(lr=1e-3, step_size=0.1)
    with pytest.raises(ConfigError, match="kl_weight: .*full fine-tuning"):
        TrainConfig(method="lat", full_finetune=True, adversarial=AdversarialConfig(kl_weight=0.1))


# ---------------------------------------------------------------------------------------------
# 3. The attacks


def test_cat_paper_attack_steps_by_lr_inside_the_embedding_norm_ball(model):
    batch = batch_of(model)
    lengths = batch.prompt_lengths[batch.harmful].tolist()
    pert = AdversarialPerturbation(model, replace(CAT, steps=1), "cat")
    (one,) = pert._attack(batch).values()
    for i, n in enumerate(lengths):  # one sign step moves every prompt coordinate by lr, nothing else
        assert torch.allclose(one[i, :n].abs(), torch.full_like(one[i, :n], 1e-4), rtol=1e-4)
        assert one[i, n:].eq(0).all()
    assert pert.cost.forward == 1  # no forward to measure token norms: the ball is the embedding matrix's
    radius = 0.05 * model.hf.get_input_embeddings().weight.norm(dim=-1).mean().item()
    (big,) = AdversarialPerturbation(model, replace(CAT, lr=1.0), "cat")._attack(batch).values()
    norms = big.norm(dim=-1)
    assert (norms <= radius * (1 + 1e-5)).all() and norms.max() > 0.99 * radius
    (paper,) = AdversarialPerturbation(model, CAT, "cat")._attack(batch).values()  # ten steps of 1e-4
    a = batch.affirm
    assert mean_ce(model, a.input_ids, a.attention_mask, a.labels, {0: paper}) < \
        mean_ce(model, a.input_ids, a.attention_mask, a.labels)


def test_lat_paper_attack_covers_prompt_and_completions_in_an_absolute_ball(model):
    batch = batch_of(model)
    # a ball three AdamW steps of 1e-3 per coordinate reach; no threshold: the tiny model's tokens all have log p
    # near log(1/260) < -5, which would leave the away term (and the refusal-only positions) without a gradient
    cfg = replace(LAT, steps=3, epsilon=0.01, away_cutoff=None)
    pert = AdversarialPerturbation(model, cfg, "lat")
    assert pert.layers == [0, 1, 2, 3]
    deltas = pert._attack(batch)
    harmful = batch.harmful.nonzero().flatten().tolist()
    ends = [max(int(batch.affirm.attention_mask[i].sum()), int(batch.attention_mask[row].sum()))
            for i, row in enumerate(harmful)]
    for d in deltas.values():
        assert d.shape[1] == max(batch.affirm.input_ids.shape[1], batch.input_ids.shape[1])
        norms = d.norm(dim=-1)
        assert (norms <= 0.01 * (1 + 1e-5)).all() and norms.max() > 0.99 * 0.01  # absolute, not relative
        for i, end in enumerate(ends):  # prompt and both continuations; the last position predicts nothing
            assert norms[i, :end - 1].gt(0).all() and norms[i, end - 1:].eq(0).all()
    assert pert.cost.forward == 3 * 2  # toward and away forwards per step; no norm measurement
    a = batch.affirm
    assert mean_ce(model, a.input_ids, a.attention_mask, a.labels, {l: d[:, :a.input_ids.shape[1]] for l, d in
                                                                      deltas.items()}) < \
        mean_ce(model, a.input_ids, a.attention_mask, a.labels)
    # in training, the attack lands on the harmful rows' responses too, and on no harmless row
    with hooks.capture(model, [0]) as base, torch.no_grad():
        model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    with pert.context(batch, 0), hooks.capture(model, [0]) as hit, torch.no_grad():  # capture sees the perturbed input
        model.hf(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    moved = (hit[0][0] - base[0][0]).norm(dim=-1) > 0
    for row in range(len(batch.harmful)):
        n = int(batch.attention_mask[row].sum())
        assert moved[row, :n - 1].all() if batch.harmful[row] else not moved[row].any()


def test_unlikelihood_away_term_of_the_attack_lowers_the_refusal(model):
    batch = batch_of(model)
    h = batch.harmful
    args = batch.input_ids[h], batch.attention_mask[h], batch.labels[h]
    cfg = replace(LAT, steps=4, epsilon=0.05, away_cutoff=None)  # (the tiny model's log p are all below -5)
    toward_only = AdversarialPerturbation(model, replace(cfg, away_weight=0.0), "lat")
    both = AdversarialPerturbation(model, cfg, "lat")
    refusal = [mean_ce(model, *args, {l: d[:, :args[0].shape[1]] for l, d in p._attack(batch).items()})
               for p in (toward_only, both)]
    assert refusal[1] > refusal[0]  # the away term makes the refusal less likely than the toward term alone


# ---------------------------------------------------------------------------------------------
# 4. The training objective


def test_objective_terms_are_their_means_under_the_attack(model):
    batch = batch_of(model)
    cfg = replace(CAT, steps=2, toward_cutoff=None, away_cutoff=None)
    pert, loss, value, parts, extra = objective(model, batch, cfg)
    h, a, d = batch.harmful, batch.affirm, pert.deltas
    toward = mean_ce(model, batch.input_ids[h], batch.attention_mask[h], batch.labels[h], d)
    utility = mean_ce(model, batch.input_ids[~h], batch.attention_mask[~h], batch.labels[~h])
    away = -mean_ce(model, a.input_ids, a.attention_mask, a.labels, d)
    assert parts == pytest.approx({"toward": toward, "utility": utility, "away": away}, rel=1e-5)
    assert value == pytest.approx(0.5 * toward + 1.0 * utility + 0.5 * away, rel=1e-5)
    assert loss.item() == pytest.approx(value, rel=1e-5)
    assert extra == {"forward": 1, "tokens": a.n_tokens, "target_tokens": int(a.labels[:, 1:].ne(-100).sum())}


def trainable_model():
    model = fresh()
    model.hf.requires_grad_(True)
    return model


@pytest.mark.parametrize("term", ["toward", "away"])
def test_a_floored_term_keeps_a_thousandth_of_its_gradient(term):
    model = trainable_model()
    batch = batch_of(model)
    weights = {"toward_weight": 1.0 if term == "toward" else 0.0, "train_away_weight": 1.0 if term == "away" else 0.0}
    params = [p for p in model.hf.parameters() if p.requires_grad]
    grads, values = [], []
    for floor in (-100.0, 100.0):  # never reached, always reached
        cuts = {"toward_cutoff": floor, "away_cutoff": None} if term == "toward" else {"away_cutoff": floor}
        _, loss, value, parts, _ = objective(model, batch, replace(CAT, steps=1, utility_weight=0.0, **weights, **cuts))
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)]))
        values.append((value, parts[term]))
    assert values[0][0] == pytest.approx(values[0][1])
    assert values[1][0] == pytest.approx(100.0 + 1e-3 * values[1][1])
    assert torch.allclose(grads[1], 1e-3 * grads[0], rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("away_loss", ["negative-ce", "unlikelihood"])
def test_the_training_away_term_pushes_the_harmful_target_down(away_loss):
    model = trainable_model()
    batch = batch_of(model)
    cfg = replace(LAT, steps=1, epsilon=0.05, toward_weight=0.0, utility_weight=0.0, kl_weight=0.0,
                  train_away_weight=1.0, away_loss=away_loss, away_cutoff=None)
    pert, loss, *_ = objective(model, batch, cfg, "lat")
    params = [p for p in model.hf.parameters() if p.requires_grad]
    a, d = batch.affirm, {l: x[:, :batch.affirm.input_ids.shape[1]] for l, x in pert.deltas.items()}
    before = mean_ce(model, a.input_ids, a.attention_mask, a.labels, d)
    with torch.no_grad():
        for p, g in zip(params, torch.autograd.grad(loss, params)):
            p -= 1e-2 * g
    assert mean_ce(model, a.input_ids, a.attention_mask, a.labels, d) > before + 1e-4


def test_the_kl_term_compares_with_the_adapters_off():
    cfg = replace(LAT, steps=1, toward_weight=0.0, train_away_weight=0.0, kl_weight=0.1)
    torch.manual_seed(0)
    lora = trainer_mod._prepare_model(fresh(), TrainConfig(method="lat", adversarial=cfg))
    batch = batch_of(lora)
    parts = objective(lora, batch, cfg, "lat")[3]
    assert parts["kl"] == 0.0  # LoRA starts as the identity: the model is its base
    with torch.no_grad():
        for name, p in lora.hf.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    _, loss, value, parts, extra = objective(lora, batch, cfg, "lat")
    rows = ~batch.harmful
    args = batch.input_ids[rows], batch.attention_mask[rows], batch.labels[rows]
    with torch.no_grad():
        new, _ = response_logits(lora, *args)
        with lora.hf.disable_adapter():
            base, _ = response_logits(lora, *args)
    kl = (new.softmax(-1) * (new.log_softmax(-1) - base.log_softmax(-1))).sum(-1).mean().item()
    assert kl > 1e-4 and parts["kl"] == pytest.approx(kl, rel=1e-4)
    assert value == pytest.approx(0.1, rel=1e-4)  # weight x KL / KL: LAT's self-normalised penalty
    assert extra["forward"] == 1 and extra["target_tokens"] == len(new)
    grads = torch.autograd.grad(loss, [p for p in lora.hf.parameters() if p.requires_grad])
    assert sum(g.abs().sum() for g in grads) > 0


# ---------------------------------------------------------------------------------------------
# 5. CAT's batch mix, training, the experiment config


def test_harmful_share_sets_the_batch_mix():
    for size in range(2, 11):  # the default is the half (rounded up) it always was
        assert trainer_mod._Sampler(PAIRS, TrainConfig(batch_size=size)).n_harmful == (size + 1) // 2
    sampler = trainer_mod._Sampler(PAIRS, TrainConfig(batch_size=8, harmful_share=0.125))
    assert (sampler.n_harmful, sampler.n_harmless) == (1, 7)
    assert sum(p.harmful for p in sampler.pairs(3)) == 1
    assert trainer_mod._Sampler(PAIRS, TrainConfig(batch_size=4, harmful_share=0.01)).n_harmful == 1
    assert trainer_mod._Sampler(PAIRS, TrainConfig(batch_size=4, harmful_share=0.99)).n_harmful == 3
    with pytest.raises(ConfigError, match=r"harmful_share: must be in \(0, 1\)"):
        TrainConfig(harmful_share=1.0)


@pytest.mark.parametrize("name, terms, forwards", [("cat-paper", {"toward", "utility", "away"}, 2),
                                                   ("lat-paper", {"toward", "utility", "away", "kl"}, 3)])
def test_training_with_a_paper_preset(tmp_path, name, terms, forwards):
    cfg = preset_config(name, adversarial={"steps": 2}, steps=2, batch_size=8, max_length=96, warmup_steps=0)
    r = train(fresh(), PAIRS, cfg, tmp_path, progress=False)
    rows = metrics(tmp_path)
    assert len(rows) == 2 and all(terms <= set(row) and torch.isfinite(torch.tensor(row["loss"])) for row in rows)
    assert r.compute["train_forward"] == 2 * forwards  # the training forward, the away term's, the base model's
    assert r.compute["perturbation"]["backward"] == 2 * 2


def test_a_defense_preset_sits_between_the_shared_train_and_its_own():
    shared = TrainConfig(adversarial=AdversarialConfig(steps=7, epsilon=0.3))
    cfg = ExperimentConfig(name="k", analysis=False, train=shared,
                           defenses=["base", "cat", {"name": "cat-paper", "method": "cat", "preset": "cat-paper",
                                                     "train": {"adversarial": {"steps": 3}}}])
    plain, paper = cfg.train_config("cat"), cfg.train_config("cat-paper")
    assert (plain.adversarial.steps, plain.adversarial.epsilon, plain.harmful_share) == (7, 0.3, 0.5)
    assert (paper.adversarial.steps, paper.adversarial.epsilon, paper.adversarial.scale, paper.harmful_share) == \
        (3, 0.05, "embedding-mean", 0.125)
    for bad, message in [({"name": "x", "method": "lat", "preset": "cat-paper"}, "preset of method cat, not lat"),
                         ({"name": "x", "method": "cat", "preset": "cat"}, "unknown preset 'cat'"),
                         ({"name": "base", "method": "base", "preset": "cat-paper"}, "nor a preset")]:
        with pytest.raises(ConfigError, match=message):
            ExperimentConfig(name="k", analysis=False, defenses=[bad])
