"""Batched greedy generation: equals one-by-one generation, works under hooks, halves batches on OOM."""

from __future__ import annotations

import pytest
import torch
from conftest import build_model

from refat import hooks
from refat.generation import batched, forward_last_logits, generate
from refat.orthogonalize import orthogonalize

PROMPTS = ["Hi", "What is the capital of France?", "ok", "Write a poem about the sea and the moon, please.",
           "abc", "Explain photosynthesis", "Name three colours."]


def _reference_greedy(model, prompt: str, n: int) -> str:
    """Greedy decoding without cache, padding or batching: the plainest possible reference."""
    ids = model.tokenizer(model.format(prompt), add_special_tokens=False, return_tensors="pt")["input_ids"]
    eos = model.tokenizer.eos_token_id
    out = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model.hf(input_ids=ids).logits[0, -1].argmax())
            if nxt == eos:
                break
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return model.tokenizer.decode(out, skip_special_tokens=True)


@pytest.fixture(scope="module")
def gen_model():
    return build_model("llama", seed=7, layers=2, hidden=32)


def test_batched_equals_one_by_one(gen_model):
    n = 12
    batch = generate(gen_model, PROMPTS, max_new_tokens=n, batch_size=4, progress=False)
    single = generate(gen_model, PROMPTS, max_new_tokens=n, batch_size=1, progress=False)
    assert batch == single
    assert len(batch) == len(PROMPTS)
    assert all(isinstance(t, str) for t in batch)
    assert len(set(batch)) > 1  # not a degenerate constant output


@pytest.mark.parametrize("arch", ["qwen2", "gpt2", "gpt_neox"])
def test_batched_equals_one_by_one_other_archs(arch):
    model = build_model(arch, seed=17)
    n = 8
    prompts = PROMPTS[:5]
    batch = generate(model, prompts, max_new_tokens=n, batch_size=4, progress=False)
    assert batch == generate(model, prompts, max_new_tokens=n, batch_size=1, progress=False)
    assert batch == [_reference_greedy(model, p, n) for p in prompts]


def test_generation_matches_uncached_reference(gen_model):
    n = 10
    got = generate(gen_model, PROMPTS[:4], max_new_tokens=n, batch_size=4, progress=False)
    assert got == [_reference_greedy(gen_model, p, n) for p in PROMPTS[:4]]


def test_generation_in_input_order(gen_model):
    n = 6
    fwd = generate(gen_model, PROMPTS, max_new_tokens=n, batch_size=3, progress=False)
    rev = generate(gen_model, PROMPTS[::-1], max_new_tokens=n, batch_size=3, progress=False)
    assert rev == fwd[::-1]


def test_generation_under_ablation(gen_model):
    n = 10
    model = gen_model
    g = torch.Generator().manual_seed(3)
    r = torch.randn(model.d_model, generator=g, dtype=torch.float64)
    # a direction the model actually uses: the mean last-layer input at the answer position
    with hooks.capture(model, layers=[model.n_layers - 1], positions=[-1]) as store:
        forward_last_logits(model, model.tokenize(PROMPTS))
    r = store[model.n_layers - 1][0][:, 0].mean(0)
    plain = generate(model, PROMPTS, max_new_tokens=n, batch_size=4, progress=False)
    with hooks.ablate(model, r):
        ablated = generate(model, PROMPTS, max_new_tokens=n, batch_size=4, progress=False)
        ablated_single = generate(model, PROMPTS, max_new_tokens=n, batch_size=1, progress=False)
    assert ablated == ablated_single
    assert ablated != plain
    assert generate(model, PROMPTS, max_new_tokens=n, batch_size=4, progress=False) == plain  # hooks gone
    # whole-stream ablation during cached decoding equals decoding the orthogonalized model
    ortho = build_model("llama", seed=7, layers=2, hidden=32)
    orthogonalize(ortho, r)
    assert generate(ortho, PROMPTS, max_new_tokens=n, batch_size=4, progress=False) == ablated


def test_generate_empty_raises(gen_model):
    with pytest.raises(ValueError, match="empty"):
        generate(gen_model, [], progress=False)


def test_generation_past_the_context_is_refused_by_name():
    """GPT-2 has 256 positions: a prompt that fits but leaves no room for the new tokens is refused before the
    model is called (it would index past its position embeddings), naming max_new_tokens."""
    from refat.models import PromptTooLongError

    model = build_model("gpt2", layers=2, hidden=32)
    prompt = "word " * 40  # ~210 tokens with the byte tokenizer and the chat template
    width = len(model.tokenizer(model.format(prompt), add_special_tokens=False)["input_ids"])
    assert width < 256 - 8
    assert len(generate(model, [prompt], max_new_tokens=256 - width, progress=False)) == 1  # exactly the context
    with pytest.raises(PromptTooLongError, match=f"max_new_tokens={256 - width + 1} exceed the model's context "
                                                 f"length 256"):
        generate(model, [prompt], max_new_tokens=256 - width + 1, progress=False)


def test_generation_stops_at_eos(gen_model):
    eos = gen_model.tokenizer.eos_token_id
    steps = []

    def force_eos_after_two(module, args, kwargs, output):  # third generated token is EOS
        steps.append(1)
        if len(steps) >= 3:
            output = output.clone()
            output[..., eos] = 1e9
        return output

    free = generate(gen_model, ["Hi"], max_new_tokens=2, batch_size=1, progress=False)[0]
    with hooks.hooked(post=[(gen_model.hf.lm_head, force_eos_after_two)]):
        out = generate(gen_model, ["Hi"], max_new_tokens=8, batch_size=1, progress=False)
    assert len(steps) == 3  # stopped as soon as every row finished
    assert out == [free]


def test_finished_rows_do_not_disturb_others(gen_model):
    eos = gen_model.tokenizer.eos_token_id
    steps = []

    def force_eos_row0(module, args, kwargs, output):  # the shortest prompt (row 0 after sorting) ends early
        steps.append(1)
        if len(steps) >= 2:
            output = output.clone()
            output[0, ..., eos] = 1e9
        return output

    prompts = ["Hi", "Tell me more about it"]
    free = generate(gen_model, prompts, max_new_tokens=8, batch_size=1, progress=False)
    one_token = generate(gen_model, ["Hi"], max_new_tokens=1, batch_size=1, progress=False)[0]
    with hooks.hooked(post=[(gen_model.hf.lm_head, force_eos_row0)]):
        out = generate(gen_model, prompts, max_new_tokens=8, batch_size=2, progress=False)
    assert out == [one_token, free[1]]


def test_forward_last_logits_matches_full_forward(gen_model):
    enc = gen_model.tokenize(PROMPTS[:3])
    last = forward_last_logits(gen_model, enc)
    assert last.shape == (3, gen_model.hf.config.vocab_size)
    for i, p in enumerate(PROMPTS[:3]):
        alone = gen_model.hf(**gen_model.tokenize([p])).logits[0, -1]
        assert torch.allclose(last[i], alone, atol=1e-10)


def test_batched_halves_on_oom():
    calls = []

    def fn(chunk):
        calls.append(len(chunk))
        if len(chunk) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [x * 10 for x in chunk]

    items = list(range(11))
    assert batched(fn, items, 8, progress=False) == [x * 10 for x in items]
    assert calls[:3] == [8, 4, 2]
    assert max(calls[3:]) <= 2 and sum(c for c in calls if c <= 2) == len(items)


def test_batched_real_oom_error_type():
    seen = []

    def fn(chunk):
        seen.append(len(chunk))
        if len(chunk) > 1:
            raise torch.OutOfMemoryError("boom")
        return chunk

    assert batched(fn, list("abcde"), 4, progress=False) == list("abcde")
    assert seen[:3] == [4, 2, 1]


def test_batched_reraises_other_errors_and_oom_at_one():
    def bad(chunk):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        batched(bad, [1, 2, 3], 2, progress=False)

    def always_oom(chunk):
        raise RuntimeError("CUDA out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        batched(always_oom, [1, 2, 3], 4, progress=False)


def test_generate_halves_on_oom(gen_model, monkeypatch):
    import refat.generation as G

    real = G._generate_batch
    sizes = []

    def flaky(model, prompts, max_new_tokens, formatted=False):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise RuntimeError("CUDA out of memory")
        return real(model, prompts, max_new_tokens, formatted)

    expected = generate(gen_model, PROMPTS, max_new_tokens=5, batch_size=1, progress=False)
    monkeypatch.setattr(G, "_generate_batch", flaky)
    assert generate(gen_model, PROMPTS, max_new_tokens=5, batch_size=8, progress=False) == expected
    assert sizes[:3] == [7, 4, 2]
