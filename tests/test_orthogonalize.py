"""Weight orthogonalization reproduces whole-stream ``project`` ablation, and saves as a plain HF checkpoint."""

from __future__ import annotations

import pytest
import torch
from conftest import unit
from transformers import AutoModelForCausalLM, AutoTokenizer

from refat import hooks
from refat.orthogonalize import orthogonalize, save_orthogonalized

CASES = [
    pytest.param("llama", True, id="llama-tied"),
    pytest.param("qwen2", False, id="qwen2-untied"),
    pytest.param("gpt2", True, id="gpt2-conv1d-tied"),
    pytest.param("gpt_neox", False, id="gptneox-untied"),
]


def _direction(model, seed=5, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(model.d_model, generator=g, dtype=torch.float64).to(dtype)


def _logits(model, enc):
    return model.hf(**enc).logits


@pytest.mark.parametrize("arch,tie", CASES)
def test_orthogonalized_weights_match_hook(model_factory, prompts, arch, tie):
    model = model_factory(arch, seed=11, tie=tie)
    if tie:
        assert model.hf.get_output_embeddings().weight is model.hf.get_input_embeddings().weight
    enc = model.tokenize(prompts)
    r = _direction(model)
    plain = _logits(model, enc)
    with hooks.ablate(model, r):
        hooked = _logits(model, enc)
    assert not torch.allclose(hooked, plain, atol=1e-4)  # the direction matters

    lm_head_before = model.hf.get_output_embeddings().weight.detach().clone()
    orthogonalize(model, r)
    ortho = _logits(model, enc)
    assert torch.allclose(ortho, hooked, atol=1e-10, rtol=0), (ortho - hooked).abs().max()
    # the unembedding must be left as it was (a tied model is untied first)
    assert torch.equal(model.hf.get_output_embeddings().weight, lm_head_before)
    # nothing is written along r̂ any more
    u = unit(r)
    with hooks.capture(model) as store:
        model.hf(**enc)
    for layer, acts in store.items():
        assert (acts[0] @ u).abs().max() < 1e-10, layer


def test_float32_direction_on_float64_model(model_factory, prompts):
    """Directions.vector returns float32; the result must still match the hook at float64 precision."""
    model = model_factory("llama", seed=12)
    enc = model.tokenize(prompts)
    r = _direction(model, dtype=torch.float32)
    with hooks.ablate(model, r):
        hooked = _logits(model, enc)
    orthogonalize(model, r)
    assert torch.allclose(_logits(model, enc), hooked, atol=1e-10, rtol=0)


def test_orthogonalize_float32_model(model_factory, prompts):
    model = model_factory("qwen2", seed=13, dtype=torch.float32, tie=True)
    enc = model.tokenize(prompts)
    r = _direction(model, dtype=torch.float32)
    with hooks.ablate(model, r):
        hooked = _logits(model, enc)
    orthogonalize(model, r)
    assert model.dtype == torch.float32
    assert torch.allclose(_logits(model, enc), hooked, atol=1e-4)


def test_orthogonalize_rejects_bad_shape(tiny):
    with pytest.raises(ValueError, match="d_model"):
        orthogonalize(tiny, torch.randn(tiny.n_layers, tiny.d_model))


@pytest.mark.parametrize("arch,tie", [CASES[0], CASES[2]])
def test_save_orthogonalized_roundtrip(model_factory, prompts, tmp_path, arch, tie):
    model = model_factory(arch, seed=21, tie=tie)
    enc = model.tokenize(prompts)
    r = _direction(model, seed=6)
    with hooks.ablate(model, r):
        hooked = _logits(model, enc)
    out = save_orthogonalized(model, r, tmp_path / "ortho")
    assert out == tmp_path / "ortho" and out.is_dir()
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())

    loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float64)
    loaded.eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == model.tokenizer.chat_template
    enc2 = {k: v for k, v in enc.items()}
    got = loaded(**enc2).logits
    assert torch.allclose(got, hooked, atol=1e-10, rtol=0), (got - hooked).abs().max()
    # reloaded embeddings and unembedding are distinct tensors (the tie was broken on save)
    assert loaded.get_output_embeddings().weight.data_ptr() != loaded.get_input_embeddings().weight.data_ptr()


def test_save_orthogonalized_refuses_nonempty_dir(tiny, tmp_path):
    out = tmp_path / "full"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        save_orthogonalized(tiny, torch.randn(tiny.d_model, dtype=torch.float64), out)
    assert (out / "keep.txt").read_text() == "x"


def test_save_orthogonalized_into_empty_dir(tiny, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    save_orthogonalized(tiny, torch.randn(tiny.d_model, dtype=torch.float64), out)
    assert (out / "config.json").is_file()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cpu_direction_on_gpu_model(model_factory, prompts):
    """Directions load on the CPU (as the CLI passes them) while the model sits on the GPU."""
    model = model_factory("llama", seed=14).to("cuda")
    enc = model.tokenize(prompts)
    r = _direction(model, dtype=torch.float32)  # CPU
    with hooks.ablate(model, r):
        hooked = _logits(model, enc)
    orthogonalize(model, r)
    assert torch.allclose(_logits(model, enc), hooked, atol=1e-8, rtol=0)
