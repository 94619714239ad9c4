"""Tiny random-init causal LMs and an offline byte-level tokenizer with a ChatML chat template.

Nothing here touches the network or loads real weights: every model is built from a config with
hidden size 32-64, 2-4 layers and a ~260-token vocabulary, so the whole suite runs in seconds.
"""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest
import torch
import transformers
from tokenizers import Tokenizer, decoders
from tokenizers import models as tok_models
from tokenizers.pre_tokenizers import ByteLevel

from refat.models import Model, wrap

torch.set_num_threads(1)
transformers.logging.set_verbosity_error()

SPECIAL_TOKENS = ["<pad>", "<eos>", "<|im_start|>", "<|im_end|>"]
CHATML_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
POST_INSTRUCTION = "<|im_end|>\n<|im_start|>assistant\n"


def make_tokenizer(chat_template: str | None = CHATML_TEMPLATE) -> transformers.PreTrainedTokenizerFast:
    """A byte-level tokenizer with no merges (one token per byte) plus ChatML special tokens: 260 ids."""
    alphabet = sorted(ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    tok = Tokenizer(tok_models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>", bos_token=None, unk_token=None)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


@pytest.fixture(scope="session")
def tokenizer_factory():
    return make_tokenizer


@pytest.fixture
def tokenizer():
    return make_tokenizer()


ARCHS = ("llama", "qwen2", "mistral", "gemma", "phi3", "gpt2", "gpt_neox")


def tiny_config(arch: str, *, vocab_size: int, hidden: int = 32, layers: int = 2, heads: int = 4,
                tie: bool = False, pad_id: int = 0, eos_id: int = 1):
    """A tiny config of one of :data:`ARCHS`; every special id lies inside the vocabulary. The rotary models'
    context (8192, no weights depend on it) takes the long prompts tests send with a byte tokenizer; GPT-2 and
    GPT-NeoX keep 256 positions, the limit refat reads off a model's config."""
    common = dict(vocab_size=vocab_size, tie_word_embeddings=tie, pad_token_id=pad_id, eos_token_id=eos_id,
                  bos_token_id=None, initializer_range=0.1)
    if arch == "gpt2":
        return transformers.GPT2Config(n_embd=hidden, n_layer=layers, n_head=heads, n_positions=256,
                                       n_inner=2 * hidden, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                       **common)
    if arch == "gpt_neox":
        return transformers.GPTNeoXConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                                          intermediate_size=2 * hidden, max_position_embeddings=256,
                                          hidden_dropout=0.0, attention_dropout=0.0, **common)
    cls = {"llama": transformers.LlamaConfig, "qwen2": transformers.Qwen2Config,
           "mistral": transformers.MistralConfig, "gemma": transformers.GemmaConfig,
           "phi3": transformers.Phi3Config}[arch]
    extra = {"head_dim": hidden // heads} if arch in ("gemma", "mistral") else {}
    if arch in ("mistral", "qwen2"):
        extra["sliding_window"] = None
    return cls(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
               num_attention_heads=heads, num_key_value_heads=max(1, heads // 2), max_position_embeddings=8192,
               **extra, **common)


def build_hf(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float64, vocab_size: int = 260,
             **cfg) -> torch.nn.Module:
    """A random-init HF causal LM (eval mode, no grads) in ``dtype``."""
    config = tiny_config(arch, vocab_size=vocab_size, **cfg)
    torch.manual_seed(seed)
    hf = transformers.AutoModelForCausalLM.from_config(config)
    hf.to(dtype)
    hf.eval()
    hf.requires_grad_(False)
    return hf


def build_model(arch: str = "llama", *, seed: int = 0, dtype: torch.dtype = torch.float64,
                max_prompt_tokens: int = 2048, **cfg) -> Model:
    """A tiny random model wrapped as a refat :class:`Model` with the offline ChatML tokenizer."""
    tok = make_tokenizer()
    cfg.setdefault("pad_id", tok.pad_token_id)
    cfg.setdefault("eos_id", tok.eos_token_id)
    hf = build_hf(arch, seed=seed, dtype=dtype, vocab_size=len(tok), **cfg)
    return wrap(hf, tok, name=f"tiny-{arch}", max_prompt_tokens=max_prompt_tokens)


@pytest.fixture(scope="session")
def model_factory():
    return build_model


@pytest.fixture
def tiny(model_factory) -> Model:
    """A fresh float64 tiny Llama (2 layers, d=32), safe to mutate."""
    return model_factory("llama", layers=2, hidden=32, seed=0)


PROMPTS = ["Hi", "How do I bake bread?", "Tell me a story about a dragon and a knight.", "x y z"]


@pytest.fixture
def prompts() -> list[str]:
    return list(PROMPTS)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def save_model(model: Model, folder) -> Path:
    """A tiny model saved as a local Hugging Face folder: what the CLI and the pipeline load by path."""
    model.hf.save_pretrained(folder)
    model.tokenizer.save_pretrained(folder)
    return Path(folder)


def write_prompts(path, prompts) -> Path:
    """A one-column CSV of prompts (quoted where a prompt needs it)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["prompt"])
    writer.writerows([p] for p in prompts)
    Path(path).write_text(buf.getvalue())
    return Path(path)


def experiment(name: str):
    """``experiments/<name>.py`` as a module (the scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
