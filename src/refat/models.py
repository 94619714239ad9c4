"""Load any Hugging Face causal LM and describe it generically: blocks, chat format, positions.

No per-model code: decoder blocks are found as the longest list of identical modules, the
post-instruction tokens are read off the tokenizer's own chat template, and the modules that
write into the residual stream are found by shape. Every choice can be overridden.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path

import torch
from torch import nn

from . import catalog
from .errors import RefatError
from .storage import digest, file_digest, read_json, write_json

__all__ = ["Model", "load", "wrap", "merge_adapter", "auto_device", "auto_dtype", "dtype_name", "is_hub_id",
           "find_blocks", "PromptTooLongError", "ModelError", "ModelNotFoundError", "context_length", "identity",
           "spec_identity", "describe_identity", "check_resumable", "file_sha256", "files_sha256", "model_files",
           "UnidentifiedModelError"]

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


def is_hub_id(spec: str) -> bool:
    """``spec`` names a hub model ('org/name'), not a catalog name, a local path or a .gguf file."""
    path = Path(spec).expanduser()
    return (spec not in catalog.CATALOG and path.suffix != ".gguf" and not path.exists()
            and not spec.startswith((".", "/", "~")) and bool(_HUB_ID.fullmatch(spec)))


def auto_device() -> torch.device:
    """This process's device: under ``torchrun`` / ``accelerate launch`` (``LOCAL_RANK`` set) GPU number
    LOCAL_RANK, so that N processes on one machine use N GPUs rather than all sharing GPU 0; a process
    that sees a single GPU (a launcher that sets CUDA_VISIBLE_DEVICES per process) uses that one."""
    if torch.cuda.is_available():
        local_rank, count = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if count == 1:
            return torch.device("cuda", 0)
        if local_rank >= count:
            raise ValueError(f"LOCAL_RANK={local_rank} but this process sees {count} GPUs: launch at most one "
                             "process per GPU (--nproc_per_node / --num_processes)")
        return torch.device("cuda", local_rank)
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def auto_dtype(device: torch.device) -> torch.dtype:
    """bf16 where the hardware has fast bf16 matmuls (Ampere and later GPUs), fp16 on older GPUs and MPS;
    fp32 on CPU, where bf16 is slow and lossy."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "mps":
        return torch.float16
    return torch.float32


def dtype_name(dtype: str | torch.dtype | None, device: str | torch.device | None = None) -> str:
    """The concrete dtype ``dtype`` means on ``device`` (default: this process's), as a canonical name
    ("auto" and "bf16" become "bfloat16" on a GPU that has it, "auto" becomes "float32" on CPU). Whatever
    caches or fingerprints results keys them by this name, never by "auto", so the same config run on
    other hardware is recognised as different work."""
    dev = torch.device(device) if device else auto_device()
    return str(_parse_dtype(dtype, dev)).removeprefix("torch.")


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
    """Describe an already-loaded HF model and tokenizer as a :class:`Model` (nothing is copied).

    Such a model has no files to fingerprint: its :func:`identity` is its name. Passing ``name`` vouches that
    the name stands for these weights, so results stored under it may be resumed; without one, resuming is
    refused (:func:`check_resumable`)."""
    source = {} if name else {"anonymous": True}
    name = name or getattr(getattr(hf_model, "config", None), "_name_or_path", None) or type(hf_model).__name__
    return Model(hf=hf_model, tokenizer=_prepare_tokenizer(tokenizer, name), name=name,
                 blocks=find_blocks(hf_model, blocks), system_prompt=system_prompt,
                 max_prompt_tokens=max_prompt_tokens, source=source, context_length=context_length(hf_model))


def merge_adapter(hf_model: nn.Module, adapter: str | Path) -> nn.Module:
    """``hf_model`` with a LoRA adapter folder (``refat train``'s ``adapter/``) merged into its weights."""
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ModelNotFoundError(f"{adapter}: not a LoRA adapter folder (no adapter_config.json)")
    from peft import PeftModel

    return PeftModel.from_pretrained(hf_model, str(adapter)).merge_and_unload()


def load(spec: str = catalog.DEFAULT_MODEL, *, dtype: str | torch.dtype | None = None, device: str | None = None,
         gguf_file: str | None = None, blocks: str | None = None, trust_remote_code: bool = False,
         system_prompt: str | None = None, max_prompt_tokens: int = 2048, adapter: str | Path | None = None,
         device_map: str | dict | None = None, revision: str | None = None) -> Model:
    """Load a causal LM from an offline catalog name, a local HF directory, a ``.gguf`` file or a hub id.

    Device and dtype are chosen automatically (this process's GPU and bf16 where available, fp16 on
    older GPUs, else CPU and fp32). ``device_map`` (e.g. "auto"): spread a model larger than one GPU
    over all of them (accelerate's big-model loading; not together with ``device``). ``revision``: a hub
    branch, tag or commit to pin a hub id to (the commit actually loaded is recorded in ``source``).
    ``adapter``: a LoRA adapter folder (e.g. ``refat train``'s ``adapter/``), merged into the weights.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if revision is not None and not is_hub_id(spec):
        raise ValueError(f"revision {revision!r}: only a hub model ('org/name') has revisions, not {spec!r}")
    if device and device_map is not None:
        raise ValueError(f"device {device!r} and device_map {device_map!r}: pass one of them")
    dev = torch.device(device) if device else auto_device()
    dt = _parse_dtype(dtype, dev)
    kwargs: dict = {"dtype": dt, "trust_remote_code": trust_remote_code}
    if device_map is not None:
        kwargs["device_map"] = device_map
    if revision is not None:
        kwargs["revision"] = revision
    if gguf_file is None:
        check_spec(spec)  # a path that does not exist fails here, never as a request to the hub
    location, gguf_file, source = _locate(spec, gguf_file, fetch=True)
    if gguf_file:
        from transformers import GgufConfig

        kwargs.update(gguf_file=gguf_file, quantization_config=GgufConfig(dequantize=True))
    folders = [Path(p) for p in (location, adapter) if p is not None and Path(p).is_dir()]
    tok_kwargs = {k: kwargs[k] for k in ("trust_remote_code", "gguf_file", "revision") if k in kwargs}
    from safetensors import SafetensorError

    try:
        tokenizer = AutoTokenizer.from_pretrained(location, **tok_kwargs)
        hf = AutoModelForCausalLM.from_pretrained(location, **kwargs)
        if device_map is None:
            hf = hf.to(dev)
        if adapter is not None:
            hf = merge_adapter(hf, adapter)
            source["adapter"] = str(adapter)
    except SafetensorError as e:
        raise ModelError(f"{_unreadable_file(folders) or location}: not a readable safetensors file ({e}); "
                         f"it is truncated or corrupted{_rebuild_hint(spec, location)}") from None
    except OSError as e:
        if e.errno is not None or isinstance(e, RefatError):  # a file-system error (with its path), or ours
            raise
        where = "the hub" if location == spec and not Path(spec).expanduser().exists() else location
        raise ModelError(f"could not load model {spec!r} from {where}: {str(e).splitlines()[0]}") from None
    if is_hub_id(spec):
        source |= {"revision": revision, "commit": getattr(hf.config, "_commit_hash", None)}
    _check_finite(hf, folders, spec, dt)
    hf.eval()
    hf.requires_grad_(False)
    model = wrap(hf, tokenizer, name=spec, blocks=blocks, system_prompt=system_prompt,
                 max_prompt_tokens=max_prompt_tokens)
    placed = {"device": str(dev)} if device_map is None else {"device_map": _placement(hf)}
    model.source = source | {"dtype": str(dt).removeprefix("torch.")} | placed
    return model


def _locate(spec: str, gguf_file: str | None, *, fetch: bool) -> tuple[str, str | None, dict]:
    """Where ``spec``'s files are (a folder or hub id), its GGUF file name if any, and the ``source`` that
    :func:`identity` reads: the catalog's pinned sha256, or the local files that hold the model. ``fetch``:
    build a catalog model's local copy if missing (the identity alone needs only its pinned hash)."""
    source: dict = {"spec": spec}
    path = Path(spec).expanduser()
    if spec in catalog.CATALOG:
        location = str(catalog.ensure_model(spec)) if fetch else ""
        source |= {"catalog": catalog.CATALOG[spec].upstream, "catalog_sha256": catalog.CATALOG[spec].sha256}
    elif path.suffix == ".gguf" or gguf_file:
        if path.suffix == ".gguf":
            if not path.is_file():
                raise FileNotFoundError(f"GGUF file not found: {path}")
            location, gguf_file = str(path.parent), path.name
        else:
            location = spec
        source["gguf_file"] = gguf_file
        if Path(location, gguf_file).is_file():
            source["files"] = [str(Path(location, gguf_file).resolve())]
        else:
            source["hub"] = spec
    elif path.is_dir():
        location = str(path)
        source["files"] = model_files(path)
    elif path.exists() or spec.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{spec}: not a model directory or .gguf file")
    elif "/" in spec:
        location = spec  # a hub id, loaded by transformers' ordinary code; its files are not pinned here
        source["hub"] = spec
    else:
        raise catalog.UnknownModelError(
            f"unknown model {spec!r}: not a catalog name ({', '.join(catalog.CATALOG)}), "
            "a local directory, a .gguf file, or an 'org/name' hub id")
    return location, gguf_file, source


# ---- identity: which weights a stored result was made with -------------------------------------------------

# what a model's outputs depend on besides its weights: configuration, tokenizer and chat template files
_MODEL_SUFFIXES = (".safetensors", ".bin", ".gguf", ".json", ".jinja", ".model", ".txt", ".tiktoken")
# source keys that identity() reads or that only say where the model came from; any other key (a pipeline's
# defense, a trained adapter) is part of the identity as it is
_LOCATION_KEYS = ("spec", "catalog", "catalog_sha256", "files", "gguf_file", "hub", "adapter", "dtype", "device")


class UnidentifiedModelError(RefatError, ValueError):
    """A stored result would be resumed with a model refat cannot identify (built in memory, unnamed)."""


def model_files(folder: str | Path) -> list[str]:
    """The files of a model or adapter folder that its outputs depend on (weights, config, tokenizer), absolute
    and sorted; hidden files and anything else (READMEs, logs) are left out."""
    folder = Path(folder)
    return sorted(str(p.resolve()) for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix in _MODEL_SUFFIXES)


def _hash_cache() -> dict:
    """The cached file hashes (``<cache_dir>/file-hashes.json``); a damaged cache is only a cache."""
    try:
        return read_json(catalog.cache_dir() / "file-hashes.json")
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | Path) -> str:
    """A file's sha256, cached by (absolute path, size, mtime, inode) in ``<cache_dir>/file-hashes.json``, so a
    16 GB model is read once, not on every run; rewriting the file (new size, time or inode) hashes it again."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns, st.st_ino]
    hit = _hash_cache().get(str(path))
    if hit and hit.get("stamp") == stamp:
        return hit["sha256"]
    sha = file_digest(path)
    cache = _hash_cache()  # again: another process may have added entries while this one hashed
    cache = {p: v for p, v in cache.items() if os.path.exists(p)} | {str(path): {"stamp": stamp, "sha256": sha}}
    try:
        write_json(catalog.cache_dir() / "file-hashes.json", cache)
    except OSError:  # a read-only home: hash again next time
        pass
    return sha


def files_sha256(files: list[str]) -> str:
    """One sha256 for a set of files: the digest of {file name: its sha256}."""
    if not files:
        raise FileNotFoundError("no model files to identify")
    return digest({os.path.basename(f): file_sha256(f) for f in files}, n=64)


def _adapter_sha256(adapter: str | Path) -> str:
    folder = Path(adapter)
    if not folder.is_dir():
        raise FileNotFoundError(f"adapter folder {folder} is gone: cannot identify the model it was merged into")
    return files_sha256(model_files(folder))


def _identity(source: dict, name: str, dtype: str, device: str) -> dict:
    """The identity a model of this ``source`` has (shared by a loaded model and by a spec not yet loaded)."""
    if "catalog_sha256" in source:
        weights = {"sha256": source["catalog_sha256"]}
    elif source.get("files"):
        weights = {"sha256": files_sha256(source["files"])}
    elif source.get("hub"):
        weights = {"hub": source["hub"]}  # not pinned: a hub id's files are whatever its cache holds
    else:
        return {"name": name, "source": {k: v for k, v in source.items() if k != "anonymous"}, "in_memory": True}
    adapter = source.get("adapter")
    return {**weights, "adapter": _adapter_sha256(adapter) if adapter else None, "dtype": dtype,
            "device": torch.device(device).type,
            **{k: v for k, v in source.items() if k not in _LOCATION_KEYS}}


def identity(model: Model) -> dict:
    """What a stored result of ``model`` is keyed by: the sha256 of its weights (the catalog's pinned hash, else
    that of its weight, config and tokenizer files, see :func:`file_sha256`), the sha256 of a merged adapter's
    files, the dtype and the device type. A model built in memory (:func:`wrap`) has no files: its identity is
    its name and source, marked ``in_memory``."""
    return _identity(model.source, model.name, str(model.dtype).removeprefix("torch."), str(model.device))


def spec_identity(spec: str, *, dtype: str | None = None, device: str | None = None,
                  adapter: str | Path | None = None) -> dict:
    """The :func:`identity` ``load(spec, dtype=, device=, adapter=)`` would give, without loading anything."""
    dev = torch.device(device) if device else auto_device()
    dt = str(_parse_dtype(dtype, dev)).removeprefix("torch.")
    _, _, source = _locate(spec, None, fetch=False)
    if adapter is not None:
        source["adapter"] = str(adapter)
    return _identity(source, spec, dt, str(dev))


def describe_identity(ident: dict | None) -> str:
    """A model identity in a line, for error messages: ``model sha256 1d961463… (+ adapter 9f8e…), float32 on cpu``."""
    if not ident:
        return "an unrecorded model"
    if ident.get("in_memory"):
        return f"in-memory model {ident.get('name')!r}"
    what = f"model sha256 {ident['sha256'][:12]}…" if "sha256" in ident else f"hub model {ident.get('hub')}"
    adapter = f"adapter {ident['adapter'][:12]}…" if ident.get("adapter") else "no adapter"
    extra = "".join(f", {k} {v}" for k, v in ident.items()
                    if k not in ("sha256", "hub", "adapter", "dtype", "device"))
    return f"{what} (+ {adapter}), {ident.get('dtype')} on {ident.get('device')}{extra}"


def check_resumable(model: Model, stored: str | Path) -> None:
    """Refuse to resume or reuse the result in ``stored`` with a model built in memory without a name: nothing
    says its weights are the ones that made it."""
    if model.source.get("anonymous"):
        raise UnidentifiedModelError(
            f"{stored} holds a stored result, but the model {model.name!r} was built in memory (refat.wrap without "
            "name=) and has no files to fingerprint; pass wrap(..., name=...) to vouch that the name stands for these "
            "weights, or write to a fresh folder")


def _placement(hf: nn.Module) -> dict[str, str] | str:
    """Where ``device_map`` put the model: one device, or module -> device when it is split."""
    placed = {k: str(v) for k, v in (getattr(hf, "hf_device_map", None) or {}).items()}
    return next(iter(placed.values())) if len(set(placed.values())) == 1 else placed


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
