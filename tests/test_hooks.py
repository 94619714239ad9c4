"""Residual-stream hooks: capture, ablate (project / mean / subtract), add, restrictions, cleanup, autograd."""

from __future__ import annotations

import pytest
import torch
from conftest import unit

from refat import hooks
from refat.hooks import ablate, ablate_hidden, add, capture


def logits(model, enc):
    return model.hf(**enc).logits


def no_hooks_left(model) -> bool:
    return all(not m._forward_pre_hooks and not m._forward_hooks for m in model.hf.modules())


@pytest.fixture
def enc(tiny, prompts):
    return tiny.tokenize(prompts)


@pytest.fixture
def r(tiny):
    g = torch.Generator().manual_seed(1)
    return torch.randn(tiny.d_model, generator=g, dtype=torch.float64)


def test_zero_direction_is_identity(tiny, enc):
    plain = logits(tiny, enc)
    zero = torch.zeros(tiny.d_model, dtype=torch.float64)
    for mode in ("project", "subtract"):
        with ablate(tiny, zero, mode=mode):
            assert torch.equal(logits(tiny, enc), plain)
    with ablate(tiny, zero, mode="mean", harmless_mean=torch.randn(tiny.d_model, dtype=torch.float64)):
        assert torch.equal(logits(tiny, enc), plain)


def test_nonzero_direction_changes_logits(tiny, enc, r):
    plain = logits(tiny, enc)
    with ablate(tiny, r):
        hooked = logits(tiny, enc)
    assert not torch.allclose(hooked, plain, atol=1e-6)
    assert torch.equal(logits(tiny, enc), plain)  # removed on exit
    assert no_hooks_left(tiny)


def test_project_leaves_no_component_at_any_layer(tiny, enc, r):
    u = unit(r)
    with capture(tiny) as before:
        tiny.hf(**enc)
    # without ablation the component is clearly there
    assert max(float((before[l][0] @ u).abs().max()) for l in before) > 1e-2
    final = []  # the stream after the last block (input of the final norm) needs the writer hooks
    with ablate(tiny, r):  # layers=None, project: whole stream
        with capture(tiny) as store, hooks.hooked(pre=[(tiny.hf.model.norm, lambda m, a, k: final.append(a[0]))]):
            tiny.hf(**enc)
    assert (final[0] @ u).abs().max() < 1e-10
    assert set(store) == set(range(tiny.n_layers))
    for layer, acts in store.items():
        assert len(acts) == 1
        comp = (acts[0] @ u).abs().max()
        assert comp < 1e-10, f"layer {layer}: |h·r̂| = {comp}"


def test_project_at_one_layer_only_edits_that_layer(tiny, enc, r):
    u = unit(r)
    with capture(tiny) as plain:
        tiny.hf(**enc)
    with ablate(tiny, r, layers=[1]):
        with capture(tiny) as store:
            tiny.hf(**enc)
    assert torch.equal(store[0][0], plain[0][0])  # layer 0 input untouched
    assert (store[1][0] @ u).abs().max() < 1e-10
    h = plain[1][0]
    assert torch.allclose(store[1][0], h - (h @ u).unsqueeze(-1) * u, atol=1e-12)


def test_mean_mode_sets_component_to_harmless_mean(tiny, enc, r):
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(tiny.n_layers, tiny.d_model, generator=g, dtype=torch.float64)
    rs = torch.randn(tiny.n_layers, tiny.d_model, generator=g, dtype=torch.float64)  # per-layer directions
    with ablate(tiny, rs, mode="mean", harmless_mean=mu):
        with capture(tiny) as store:
            tiny.hf(**enc)
    for layer in range(tiny.n_layers):
        u = unit(rs[layer])
        comp = store[layer][0] @ u
        target = mu[layer] @ u
        assert torch.allclose(comp, torch.full_like(comp, float(target)), atol=1e-10), layer


def test_mean_mode_requires_mean(tiny, r):
    with pytest.raises(ValueError, match="harmless"):
        with ablate(tiny, r, mode="mean"):
            pass
    with pytest.raises(ValueError, match="mode"):
        with ablate(tiny, r, mode="bogus"):
            pass
    assert no_hooks_left(tiny)


def test_subtract_subtracts_r(tiny, enc, r):
    with capture(tiny, layers=[1]) as plain:
        tiny.hf(**enc)
    with ablate(tiny, r, mode="subtract", layers=[1]):
        with capture(tiny, layers=[1]) as store:
            tiny.hf(**enc)
    assert torch.allclose(store[1][0], plain[1][0] - r, atol=1e-12)


def test_ablate_hidden_modes():
    torch.manual_seed(0)
    h = torch.randn(2, 3, 8, dtype=torch.float64)
    r = torch.randn(8, dtype=torch.float64)
    mu = torch.randn(8, dtype=torch.float64)
    u = unit(r)
    p = ablate_hidden(h, r, "project")
    assert torch.allclose(p @ u, torch.zeros(2, 3, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(p + (h @ u).unsqueeze(-1) * u, h, atol=1e-12)  # only the r̂ component changed
    m = ablate_hidden(h, r, "mean", mu)
    assert torch.allclose(m @ u, (mu @ u).expand(2, 3), atol=1e-12)
    assert torch.allclose(ablate_hidden(h, r, "subtract"), h - r)
    assert torch.allclose(ablate_hidden(h, 5 * r, "project"), p, atol=1e-12)  # scale invariant


def test_rows_restriction(tiny, enc, r):
    plain = logits(tiny, enc)
    with ablate(tiny, r, rows=[1, 3]):
        out = logits(tiny, enc)
    for i in (0, 2):
        assert torch.equal(out[i], plain[i]), f"row {i} should be untouched"
    for i in (1, 3):
        assert not torch.allclose(out[i], plain[i], atol=1e-6), f"row {i} should be edited"
    # the edited rows equal what an unrestricted ablation gives them
    with ablate(tiny, r):
        full = logits(tiny, enc)
    assert torch.allclose(out[[1, 3]], full[[1, 3]], atol=1e-12)


def test_rows_as_boolean_mask(tiny, enc, r):
    plain = logits(tiny, enc)
    with ablate(tiny, r, rows=torch.tensor([True, False, False, True])):
        out = logits(tiny, enc)
    assert torch.equal(out[1], plain[1]) and torch.equal(out[2], plain[2])
    assert not torch.allclose(out[0], plain[0], atol=1e-6)


def test_positions_restriction(tiny, enc, r):
    u = unit(r)
    plain = logits(tiny, enc)
    with capture(tiny) as plain_acts:
        tiny.hf(**enc)
    with ablate(tiny, r, positions=[-2, -1]):
        with capture(tiny) as acts:
            out = logits(tiny, enc)
    # a causal model: positions before the edited ones see nothing of the edit
    assert torch.equal(out[:, :-2], plain[:, :-2])
    assert not torch.allclose(out[:, -2:], plain[:, -2:], atol=1e-6)
    # layer 0 inputs: only the chosen positions changed, and they lost their r̂ component
    h0, p0 = acts[0][0], plain_acts[0][0]
    assert torch.equal(h0[:, :-2], p0[:, :-2])
    assert (h0[:, -2:] @ u).abs().max() < 1e-10
    assert (p0[:, -2:] @ u).abs().max() > 1e-3


def test_positions_slice(tiny, enc, r):
    plain = logits(tiny, enc)
    with ablate(tiny, r, positions=slice(-1, None), mode="subtract"):
        out = logits(tiny, enc)
    assert torch.equal(out[:, :-1], plain[:, :-1])
    assert not torch.allclose(out[:, -1], plain[:, -1], atol=1e-6)


def test_hooks_removed_after_exception(tiny, enc, r):
    plain = logits(tiny, enc)
    with pytest.raises(RuntimeError, match="boom"):
        with ablate(tiny, r):
            with capture(tiny):
                with add(tiny, r, layers=[0], coeff=3.0):
                    assert not no_hooks_left(tiny)
                    raise RuntimeError("boom")
    assert no_hooks_left(tiny)
    assert torch.equal(logits(tiny, enc), plain)


def test_add_changes_and_restores(tiny, enc, r):
    plain = logits(tiny, enc)
    with capture(tiny, layers=[1]) as base:
        tiny.hf(**enc)
    with add(tiny, r, layers=[1], coeff=2.5):
        with capture(tiny, layers=[1]) as store:
            out = logits(tiny, enc)
    assert not torch.allclose(out, plain, atol=1e-6)
    assert torch.allclose(store[1][0], base[1][0] + 2.5 * r, atol=1e-12)
    assert torch.equal(logits(tiny, enc), plain)
    assert no_hooks_left(tiny)
    with add(tiny, r, layers=[1], coeff=0.0):
        assert torch.equal(logits(tiny, enc), plain)


def test_layer_and_shape_validation(tiny, r):
    with pytest.raises(ValueError, match="out of range"):
        with ablate(tiny, r, layers=[tiny.n_layers]):
            pass
    with pytest.raises(ValueError, match="d_model"):
        with ablate(tiny, torch.zeros(tiny.d_model + 1)):
            pass
    assert no_hooks_left(tiny)


def test_negative_layer_index(tiny, enc, r):
    with capture(tiny, layers=[-1]) as store:
        tiny.hf(**enc)
    assert list(store) == [tiny.n_layers - 1]


def test_capture_positions_and_detach(tiny, enc):
    with capture(tiny, positions=[-3, -1]) as store:
        tiny.hf(**enc)
    with capture(tiny) as full:
        tiny.hf(**enc)
    for l in store:
        assert store[l][0].shape == (enc["input_ids"].shape[0], 2, tiny.d_model)
        assert torch.equal(store[l][0], full[l][0][:, [-3, -1]])
        assert not store[l][0].requires_grad


def test_gradients_flow_through_ablation(model_factory, prompts):
    model = model_factory("llama", seed=3, dtype=torch.float32)
    model.hf.requires_grad_(True)
    model.hf.train()
    enc = model.tokenize(prompts)
    r = torch.randn(model.d_model)
    emb = model.hf.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
    with ablate(model, r, rows=[0, 1], positions=[-3, -2, -1]):
        with capture(model, layers=[1], detach=False) as store:
            out = model.hf(inputs_embeds=emb, attention_mask=enc["attention_mask"])
    loss = out.logits[:, -1].logsumexp(-1).sum() + store[1][0].pow(2).sum()
    loss.backward()
    assert store[1][0].requires_grad
    assert emb.grad is not None and torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    emb_w = model.hf.get_input_embeddings().weight
    grads = [p.grad for p in model.hf.parameters() if p is not emb_w]  # inputs_embeds bypass the table
    assert all(g is not None for g in grads)
    assert all(torch.isfinite(g).all() for g in grads)
    assert no_hooks_left(model)


def test_projection_blocks_gradient_along_direction(model_factory, prompts):
    """Through a project ablation at layer 0, the loss cannot depend on the input's r̂ component."""
    model = model_factory("llama", seed=4)
    model.hf.requires_grad_(True)
    enc = model.tokenize(prompts)
    r = torch.randn(model.d_model, dtype=torch.float64)
    u = unit(r)
    emb = model.hf.get_input_embeddings()(enc["input_ids"]).detach().requires_grad_(True)
    with ablate(model, r, layers=[0], rows=[0, 1]):
        out = model.hf(inputs_embeds=emb, attention_mask=enc["attention_mask"])
    out.logits.pow(2).sum().backward()
    along = emb.grad @ u  # [batch, seq]
    mask = enc["attention_mask"].bool()
    assert along[:2][mask[:2]].abs().max() < 1e-10  # ablated rows: no gradient along r̂
    assert along[2:][mask[2:]].abs().max() > 1e-6  # unrestricted rows: gradient along r̂ exists
