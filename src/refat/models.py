"""Load any Hugging Face causal LM and describe it generically: blocks, chat format, positions.

No per-model code: decoder blocks are found as the longest list of identical modules, the
post-instruction tokens are read off the tokenizer's own chat template, and the modules that
write into the residual stream are found by shape. Every choice can be overridden.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from . import catalog
from .errors import RefatError

__all__ = ["Model", "load", "wrap", "merge_adapter", "auto_device", "auto_dtype", "find_blocks", "PromptTooLongError",
           "ModelError", "ModelNotFoundError", "context_length"]

_PLACEHOLDER = "\uE000refat-instruction\uE000"
FALLBACK_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ m['content'] }}\n\n"
    "{% elif m['role'] == 'user' %}### Instruction:\n{{ m['content'] }}\n\n"
    "{% else %}### Response:\n{{ m['content'] }}\n\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}### Response:\n{% endif %}"
)


class PromptTooLongError(RefatError, ValueError):
    pass


class ModelError(RefatError, ValueError):
    """A model that cannot be used as given: weights that are truncated or not finite, a hub id that cannot be
    loaded, an unknown dtype, no decoder blocks."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """A model path (folder, .gguf file, adapter) that does not exist or is not a model."""


_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def check_spec(spec: str) -> None:
    """Cheap, before anything loads (and the first thing :func:`load` does): a catalog name, an existing HF
    directory or .gguf file, or an 'org/name' hub id. A path that does not exist raises
    :class:`ModelNotFoundError`; anything else that is none of these, ``catalog.UnknownModelError``."""
    if spec in catalog.CATALOG:
        return
    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelNotFoundError(f"GGUF file not found: {path}")
        return
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(f"{path} is a folder but not a Hugging Face model (no config.json)")
        return
    if path.exists() or spec.startswith((".", "/", "~")):
        raise ModelNotFoundError(f"no model directory or .gguf file at {path}")
    if not _HUB_ID.fullmatch(spec):
        raise catalog.UnknownModelError(
            f"unknown model {spec!r}: not a catalog name ({', '.join(catalog.CATALOG)}), an existing local "
            "directory, a .gguf file, or an 'org/name' hub id")


def auto_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has fast bf16 matmuls (GPUs); fp32 on CPU, where bf16 is slow and lossy."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def _parse_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == "auto":
        return auto_dtype(device)
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16, "fp64": torch.float64, "float64": torch.float64}
    if dtype not in names:
        raise ModelError(f"unknown dtype {dtype!r}; use one of {', '.join(names)} or 'auto'")
    return names[dtype]


def _get(root: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        root = getattr(root, part)
    return root


def find_blocks(model: nn.Module, path: str | None = None) -> nn.ModuleList:
    """The decoder blocks: ``path`` if given, else the longest ModuleList of one module class."""
    if path:
        try:
            blocks = _get(model, path)
        except AttributeError as e:
            raise ModelError(f"block path {path!r} not found in {type(model).__name__}") from e
        return blocks
    best = None
    for _, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            if len({type(m) for m in module}) == 1 and (best is None or len(module) > len(best)):
                best = module
    if best is None:
        raise ModelError(f"no decoder blocks found in {type(model).__name__}; pass blocks='model.layers' or similar")
    return best


def _width_out(m: nn.Module) -> int | None:
    """Output width of a Linear, a GPT-2 Conv1D, or a peft LoRA wrapper around either; None otherwise."""
    if hasattr(m, "base_layer"):  # peft LoRA layer: its output is base + low-rank update
        return _width_out(m.base_layer)
    if isinstance(m, nn.Linear):
        return m.out_features
    if type(m).__name__ == "Conv1D":
        return m.weight.shape[1]
    return None


def _residual_writers(block: nn.Module, d_model: int) -> list[nn.Module]:
    """The projections that write into the residual stream: per sub-layer (attention, MLP), the last
    registered Linear/Conv1D whose output width is the model width (o_proj, down_proj, c_proj, dense...)."""
    writers = []
    for child in block.children():
        last = None
        for name, m in child.named_modules():
            if "lora_" in name or name.endswith("base_layer"):
                continue  # the inside of a LoRA wrapper; the wrapper itself is the writer
            if _width_out(m) == d_model:
                last = m
        if last is not None:
            writers.append(last)
    return writers


def context_length(hf_model: nn.Module) -> int | None:
    """The most positions the model takes (``max_position_embeddings``, GPT-2's ``n_positions``); None if its
    config does not say. A longer input fails deep inside the model (an IndexError in a position table)."""
    config = getattr(hf_model, "config", None)
    if config is None:
        return None
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    n = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    return n if isinstance(n, int) and n > 0 else None


@dataclass
class Model:
    """A loaded causal LM with everything refat needs to know about it.

    ``max_prompt_tokens`` is lowered to ``context_length`` when the model's context is shorter, so a long
    prompt is a :class:`PromptTooLongError` naming the limit, never an IndexError inside the model."""

    hf: nn.Module
    tokenizer: object
    name: str
    blocks: nn.ModuleList
    system_prompt: str | None = None
    max_prompt_tokens: int = 2048
    source: dict = field(default_factory=dict)
    context_length: int | None = None

    def __post_init__(self):
        if self.context_length is not None and self.max_prompt_tokens > self.context_length:
            self.max_prompt_tokens = self.context_length

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.hf.parameters()).dtype

    @property
    def n_layers(self) -> int:
        return len(self.blocks)

    @cached_property
    def d_model(self) -> int:
        return self.hf.get_input_embeddings().weight.shape[1]

    @cached_property
    def writers(self) -> list[list[nn.Module]]:
        """Per block, the modules whose outputs are added to the residual stream."""
        return [_residual_writers(b, self.d_model) for b in self.blocks]

    def messages(self, instruction: str, response: str | None = None) -> list[dict]:
        msgs = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        msgs.append({"role": "user", "content": instruction})
        if response is not None:
            msgs.append({"role": "assistant", "content": response})
        return msgs

    def format(self, instruction: str) -> str:
        """The instruction in the model's chat template, ready for the assistant's answer."""
        return self.tokenizer.apply_chat_template(self.messages(instruction), tokenize=False, add_generation_prompt=True)

    @cached_property
    def post_instruction(self) -> str:
        """The text the chat template places after the user's instruction (e.g. ``<|im_end|>\\n<|im_start|>assistant\\n``)."""
        text = self.format(_PLACEHOLDER)
        if text.count(_PLACEHOLDER) != 1:
            raise ValueError(f"the chat template of {self.name} does not contain the instruction exactly once")
        return text.split(_PLACEHOLDER)[1]

    @cached_property
    def post_instruction_ids(self) -> list[int]:
        """Token ids of :attr:`post_instruction`, as they appear at the end of every formatted prompt."""
        ids = self.tokenizer(self.post_instruction, add_special_tokens=False)["input_ids"]
        probe = self.tokenizer(self.format("Hello there"), add_special_tokens=False)["input_ids"]
        # a tokenizer may merge across the boundary: keep only the suffix that really matches
        n = 0
        while n < min(len(ids), len(probe)) and ids[-1 - n] == probe[-1 - n]:
            n += 1
        if n == 0:
            raise ValueError(f"could not locate the post-instruction tokens of {self.name}'s chat template")
        return ids[-n:]

    @property
    def post_instruction_positions(self) -> list[int]:
        """Negative offsets of the post-instruction tokens in a left-padded batch (e.g. [-5, ..., -1])."""
        n = len(self.post_instruction_ids)
        return list(range(-n, 0))

    def tokenize(self, instructions: list[str], *, formatted: bool = False) -> dict[str, torch.Tensor]:
        """Chat-format and tokenize a batch with left padding; refuses prompts over ``max_prompt_tokens``."""
        if not instructions:
            raise ValueError("empty prompt set: nothing to run")
        texts = instructions if formatted else [self.format(x) for x in instructions]
        enc = self.tokenizer(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        lengths = enc["attention_mask"].sum(1)
        too_long = [(i, int(n)) for i, n in enumerate(lengths) if n > self.max_prompt_tokens]
        if too_long:
            i, n = too_long[0]
            why = " (the model's context length)" if self.max_prompt_tokens == self.context_length else ""
            raise PromptTooLongError(
                f"{len(too_long)} prompt(s) exceed max_prompt_tokens={self.max_prompt_tokens}{why}; "
                f"prompt #{i} has {n} tokens: {instructions[i][:80]!r}...")
        return {k: v.to(self.device) for k, v in enc.items()}


def _prepare_tokenizer(tok, name: str):
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token if tok.eos_token is not None else tok.unk_token
    if getattr(tok, "chat_template", None) is None:
        warnings.warn(f"{name} has no chat template; using a plain '### Instruction/### Response' format", stacklevel=3)
        tok.chat_template = FALLBACK_TEMPLATE
    return tok


def wrap(hf_model: nn.Module, tokenizer, *, name: str | None = None, blocks: str | None = None,
         system_prompt: str | None = None, max_prompt_tokens: int = 2048) -> Model:
    """Describe an already-loaded HF model and tokenizer as a :class:`Model` (nothing is copied)."""
    name = name or getattr(getattr(hf_model, "config", None), "_name_or_path", None) or type(hf_model).__name__
    return Model(hf=hf_model, tokenizer=_prepare_tokenizer(tokenizer, name), name=name,
                 blocks=find_blocks(hf_model, blocks), system_prompt=system_prompt,
                 max_prompt_tokens=max_prompt_tokens, context_length=context_length(hf_model))


def merge_adapter(hf_model: nn.Module, adapter: str | Path) -> nn.Module:
    """``hf_model`` with a LoRA adapter folder (``refat train``'s ``adapter/``) merged into its weights."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model, str(adapter)).merge_and_unload()


def load(spec: str = catalog.DEFAULT_MODEL, *, dtype: str | torch.dtype | None = None, device: str | None = None,
         gguf_file: str | None = None, blocks: str | None = None, trust_remote_code: bool = False,
         system_prompt: str | None = None, max_prompt_tokens: int = 2048, adapter: str | Path | None = None) -> Model:
    """Load a causal LM from an offline catalog name, a local HF directory, a ``.gguf`` file or a hub id.

    Device and dtype are chosen automatically (GPU and bf16 where available, else CPU and fp32).
    ``adapter``: a LoRA adapter folder (e.g. ``refat train``'s ``adapter/``), merged into the weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dev = torch.device(device) if device else auto_device()
    dt = _parse_dtype(dtype, dev)
    kwargs: dict = {"dtype": dt, "trust_remote_code": trust_remote_code}
    source = {"spec": spec}
    path = Path(spec).expanduser()
    if gguf_file is None:
        check_spec(spec)  # a path that does not exist fails here, never as a request to the hub
    if spec in catalog.CATALOG:
        location = str(catalog.ensure_model(spec))
        source["catalog"] = catalog.CATALOG[spec].upstream
    elif path.suffix == ".gguf" or gguf_file:
        from transformers import GgufConfig

        if path.suffix == ".gguf":
            location, gguf_file = str(path.parent), path.name
        else:
            location = spec
        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
        source["gguf_file"] = gguf_file
    else:
        location = str(path) if path.is_dir() else spec  # a local HF folder, else an 'org/name' hub id
    folders = [Path(p) for p in (location, adapter) if p is not None and Path(p).is_dir()]
    tok_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "gguf_file") if k in kwargs}
    from safetensors import SafetensorError

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
        hf = AutoModelForCausalLM.from_pretrained(location, **kwargs).to(dev)
        if adapter is not None:
            hf = merge_adapter(hf, adapter)
            source["adapter"] = str(adapter)
    except SafetensorError as e:
        raise ModelError(f"{_unreadable_file(folders) or location}: not a readable safetensors file ({e}); "
                         f"it is truncated or corrupted{_rebuild_hint(spec, location)}") from None
    except OSError as e:
        if e.errno is not None or isinstance(e, RefatError):  # a file-system error (with its path), or ours
            raise
        where = "the hub" if location == spec and not path.exists() else location
        raise ModelError(f"could not load model {spec!r} from {where}: {str(e).splitlines()[0]}") from None
    _check_finite(hf, folders, spec, dt)
    hf.eval()
    hf.requires_grad_(False)
    model = wrap(hf, tokenizer, name=spec, blocks=blocks, system_prompt=system_prompt,
                 max_prompt_tokens=max_prompt_tokens)
    model.source = source | {"dtype": str(dt).removeprefix("torch."), "device": str(dev)}
    return model


def _weight_files(folders: list[Path]) -> list[Path]:
    return [f for folder in folders for f in sorted(folder.glob("*.safetensors"))]


def _unreadable_file(folders: list[Path]) -> Path | None:
    """The first safetensors file in ``folders`` whose header cannot be read (looked for only after a failure)."""
    from safetensors import SafetensorError, safe_open

    for f in _weight_files(folders):
        try:
            with safe_open(str(f), framework="pt") as s:
                s.keys()
        except (SafetensorError, OSError):
            return f
    return None


def _rebuild_hint(spec: str, location: str) -> str:
    return f"; delete {location} and `refat fetch {spec}` rebuilds it" if spec in catalog.CATALOG else ""


def _check_finite(hf: nn.Module, folders: list[Path], spec: str, dtype: torch.dtype) -> None:
    """Refuse weights holding NaN or inf (a corrupted file gives NaN directions and silently wrong results),
    naming the file and tensor where the files show it."""
    bad = next((name for name, p in hf.named_parameters() if p.is_floating_point() and not torch.isfinite(p).all()),
               None)
    if bad is None:
        return
    from safetensors import safe_open

    for f in _weight_files(folders):
        with safe_open(str(f), framework="pt") as s:
            for key in s.keys():
                t = s.get_tensor(key)
                if t.is_floating_point() and not torch.isfinite(t).all():
                    raise ModelError(f"{f}: tensor {key!r} holds NaN or infinite values; the file is corrupted"
                                     f"{_rebuild_hint(spec, str(f.parent))}")
    raise ModelError(f"{spec}: weight {bad!r} is NaN or infinite once loaded in {str(dtype).removeprefix('torch.')} "
                     "(out of that dtype's range?); load it in float32")
