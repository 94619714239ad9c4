"""Generic model description: blocks, residual writers, chat format, post-instruction tokens, tokenization, load errors."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHS, POST_INSTRUCTION, build_hf, make_tokenizer
from torch import nn

from refat import catalog, models
from refat.models import PromptTooLongError, find_blocks, wrap

EXPECTED_WRITERS = {
    "llama": ("self_attn.o_proj", "mlp.down_proj"),
    "qwen2": ("self_attn.o_proj", "mlp.down_proj"),
    "mistral": ("self_attn.o_proj", "mlp.down_proj"),
    "gemma": ("self_attn.o_proj", "mlp.down_proj"),
    "phi3": ("self_attn.o_proj", "mlp.down_proj"),
    "gpt2": ("attn.c_proj", "mlp.c_proj"),
    "gpt_neox": ("attention.dense", "mlp.dense_4h_to_h"),
}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("layers", [2, 3])
def test_find_blocks_and_writers(arch, layers):
    hf = build_hf(arch, layers=layers, hidden=32, vocab_size=len(make_tokenizer()), pad_id=0, eos_id=1)
    blocks = find_blocks(hf)
    assert isinstance(blocks, nn.ModuleList)
    assert len(blocks) == layers == hf.config.num_hidden_layers
    assert len({type(b) for b in blocks}) == 1
    assert "Layer" in type(blocks[0]).__name__ or "Block" in type(blocks[0]).__name__
    model = wrap(hf, make_tokenizer(), name=arch)
    assert model.n_layers == layers and model.d_model == 32
    assert len(model.writers) == layers
    for block, writers in zip(model.blocks, model.writers):
        assert len(writers) == 2
        names = {id(m): n for n, m in block.named_modules()}
        assert tuple(names[id(w)] for w in writers) == EXPECTED_WRITERS[arch]
        for w in writers:  # each writes d_model-wide outputs
            out = w.out_features if isinstance(w, nn.Linear) else w.weight.shape[1]
            assert out == model.d_model


def test_find_blocks_explicit_path():
    hf = build_hf("llama", vocab_size=260)
    assert find_blocks(hf, "model.layers") is hf.model.layers
    with pytest.raises(ValueError, match="not found"):
        find_blocks(hf, "model.nope")
    with pytest.raises(ValueError, match="no decoder blocks"):
        find_blocks(nn.Linear(2, 2))


def test_wrap_properties(tiny):
    assert tiny.dtype == torch.float64
    assert tiny.device.type == "cpu"
    assert tiny.blocks is tiny.hf.model.layers
    assert tiny.tokenizer.padding_side == "left"


def test_post_instruction_ids(tiny):
    tok = tiny.tokenizer
    assert tiny.post_instruction == POST_INSTRUCTION
    ids = tiny.post_instruction_ids
    assert ids == tok(POST_INSTRUCTION, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == POST_INSTRUCTION
    assert tiny.post_instruction_positions == list(range(-len(ids), 0))
    for instruction in ("Hello there", "Why is the sky blue?"):
        full = tok(tiny.format(instruction), add_special_tokens=False)["input_ids"]
        assert full[-len(ids):] == ids
        before = tok.decode(full[:-len(ids)])
        assert before.endswith(instruction)  # the tokens just before are the instruction's own


def test_post_instruction_with_system_prompt():
    hf = build_hf("llama", vocab_size=260)
    model = wrap(hf, make_tokenizer(), system_prompt="You are helpful.")
    text = model.format("Hi")
    assert text.startswith("<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi")
    assert model.post_instruction == POST_INSTRUCTION


def test_fallback_template_when_tokenizer_has_none():
    hf = build_hf("llama", vocab_size=260)
    with pytest.warns(UserWarning, match="no chat template"):
        model = wrap(hf, make_tokenizer(chat_template=None))
    assert model.format("Do it") == "### Instruction:\nDo it\n\n### Response:\n"
    assert model.post_instruction == "\n\n### Response:\n"
    assert model.tokenizer.decode(model.post_instruction_ids) == "\n\n### Response:\n"


def test_tokenize_left_pads(tiny):
    enc = tiny.tokenize(["Hi", "A much longer instruction than the first one"])
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 2
    assert mask[1].all()
    n_pad = int((mask[0] == 0).sum())
    assert n_pad > 0
    assert (mask[0, :n_pad] == 0).all() and (mask[0, n_pad:] == 1).all()  # padding on the left
    assert (ids[0, :n_pad] == tiny.tokenizer.pad_token_id).all()
    post = torch.tensor(tiny.post_instruction_ids)
    for row in ids:  # the post-instruction tokens sit at the same negative offsets in every row
        assert torch.equal(row[tiny.post_instruction_positions], post)
    single = tiny.tokenize(["Hi"])["input_ids"][0]
    assert torch.equal(ids[0, n_pad:], single)


def test_tokenize_formatted(tiny):
    text = tiny.format("Hi")
    assert torch.equal(tiny.tokenize([text], formatted=True)["input_ids"], tiny.tokenize(["Hi"])["input_ids"])


def test_prompt_too_long_names_the_prompt():
    hf = build_hf("llama", vocab_size=260)
    model = wrap(hf, make_tokenizer(), max_prompt_tokens=40)
    long_prompt = "This prompt is definitely far too long for the limit"
    with pytest.raises(PromptTooLongError) as info:
        model.tokenize(["ok", long_prompt])
    msg = str(info.value)
    assert "max_prompt_tokens=40" in msg
    assert "prompt #1" in msg
    assert long_prompt[:40] in msg
    assert isinstance(info.value, ValueError)
    model.tokenize(["ok"])  # short ones still fine


def test_empty_prompt_list(tiny):
    with pytest.raises(ValueError, match="empty"):
        tiny.tokenize([])


def test_load_unknown_name_lists_catalog():
    with pytest.raises(catalog.UnknownModelError) as info:
        models.load("no-such-model", device="cpu")
    msg = str(info.value)
    assert "no-such-model" in msg
    for name in ("qwen2.5-coder-0.5b", "smollm2-135m"):
        assert name in msg


def test_catalog_entry_unknown():
    with pytest.raises(catalog.UnknownModelError) as info:
        catalog.entry("nope")
    assert "qwen2.5-coder-0.5b" in str(info.value) and "smollm2-135m" in str(info.value)
    assert catalog.entry("smollm2-135m").name == "smollm2-135m"


def test_load_missing_gguf(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        models.load(str(tmp_path / "missing.gguf"), device="cpu")


def test_load_missing_local_path(tmp_path):
    with pytest.raises(FileNotFoundError):
        models.load(str(tmp_path / "nothing-here"), device="cpu")


def test_load_local_directory(tmp_path, prompts):
    hf = build_hf("qwen2", vocab_size=260, pad_id=256, eos_id=259, dtype=torch.float32)
    tok = make_tokenizer()
    hf.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    model = models.load(str(tmp_path / "m"), device="cpu", dtype="fp64", max_prompt_tokens=99)
    assert model.dtype == torch.float64 and model.max_prompt_tokens == 99
    assert model.n_layers == 2 and model.source["dtype"] == "float64"
    assert not any(p.requires_grad for p in model.hf.parameters())
    assert not model.hf.training
    enc = model.tokenize(prompts)
    assert torch.allclose(model.hf(**enc).logits, hf.double()(**enc).logits, atol=1e-10)


def test_parse_dtype():
    cpu = torch.device("cpu")
    assert models._parse_dtype(None, cpu) == torch.float32
    assert models._parse_dtype("bf16", cpu) == torch.bfloat16
    assert models._parse_dtype(torch.float16, cpu) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        models._parse_dtype("int3", cpu)


# ---------------------------------------------------------------------------------------------
# Device, dtype, device_map and revision (no GPU needed: the CUDA queries are patched)


def _fake_gpus(monkeypatch, count: int, bf16: bool = True) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


@pytest.mark.parametrize("local_rank, expected", [(None, "cuda:0"), ("0", "cuda:0"), ("3", "cuda:3")])
def test_auto_device_is_this_process_gpu(monkeypatch, local_rank, expected):
    _fake_gpus(monkeypatch, 4)
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    assert models.auto_device() == torch.device(expected)


def test_auto_device_one_visible_gpu_per_process_and_too_many_processes(monkeypatch):
    _fake_gpus(monkeypatch, 1)
    monkeypatch.setenv("LOCAL_RANK", "5")  # a launcher that restricts CUDA_VISIBLE_DEVICES per process
    assert models.auto_device() == torch.device("cuda:0")
    _fake_gpus(monkeypatch, 2)
    with pytest.raises(ValueError, match="LOCAL_RANK=5 but this process sees 2 GPUs"):
        models.auto_device()


def test_auto_dtype_and_dtype_name(monkeypatch):
    assert models.dtype_name("auto", "cpu") == "float32"
    assert models.dtype_name("bf16", "cpu") == "bfloat16"
    _fake_gpus(monkeypatch, 1, bf16=True)
    assert models.dtype_name("auto") == "bfloat16"  # the device defaults to this process's
    _fake_gpus(monkeypatch, 1, bf16=False)  # e.g. a V100
    assert models.dtype_name("auto", "cuda:0") == "float16"
    assert models.dtype_name("auto", "cpu") == "float32"


class _Loaded(Exception):
    pass


def test_revision_and_device_map_reach_from_pretrained(monkeypatch):
    import transformers

    calls = {}

    def fake(kind):
        def from_pretrained(location, **kwargs):
            calls[kind] = (location, kwargs)
            if kind == "model":
                raise _Loaded
            return make_tokenizer()
        return from_pretrained

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake("tokenizer"))
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", fake("model"))
    with pytest.raises(_Loaded):
        models.load("org/some-model", revision="abc123", device_map="auto", dtype="float32")
    assert calls["tokenizer"] == ("org/some-model", {"trust_remote_code": False, "revision": "abc123"})
    location, kwargs = calls["model"]
    assert location == "org/some-model"
    assert kwargs["revision"] == "abc123" and kwargs["device_map"] == "auto" and kwargs["dtype"] == torch.float32


def test_revision_only_for_hub_ids_and_device_map_not_with_device(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ValueError, match="only a hub model"):
        models.load(str(tmp_path / "m"), revision="main")
    with pytest.raises(ValueError, match="only a hub model"):
        models.load(catalog.DEFAULT_MODEL, revision="main")
    with pytest.raises(ValueError, match="pass one of them"):
        models.load("org/some-model", device="cpu", device_map="auto")
    assert models.is_hub_id("org/name") and not models.is_hub_id(str(tmp_path / "m"))


def test_load_records_the_hub_commit(tmp_path, monkeypatch):
    """A hub model's source names the revision asked for and the commit transformers resolved."""
    import transformers

    hf = build_hf("qwen2", vocab_size=260, pad_id=256, eos_id=259, dtype=torch.float32)
    hf.config._commit_hash = "f" * 40
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: make_tokenizer())
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: hf)
    model = models.load("org/some-model", revision="v1", device="cpu")
    assert model.source["revision"] == "v1" and model.source["commit"] == "f" * 40
    assert model.source["device"] == "cpu" and model.source["dtype"] == "float32"
