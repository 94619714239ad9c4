"""One trainer for every method: LoRA (or full) fine-tuning on refusal/answer pairs, with the
method's perturbation around the harmful rows' forward pass, resumable checkpoints, compute
accounting and optional data parallelism (``torchrun``/``accelerate launch``, gloo or nccl).

Every random choice (batch order, RFA coins, prompts for recomputing features) is a function of
(seed, step), so a resumed run and a data-parallel run see exactly what a single uninterrupted
run sees.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from ..configs import FieldError, at_least, require
from ..memory import release_freed_memory
from ..models import Model, check_resumable, describe_identity, files_sha256, identity, model_files, wrap
from ..storage import FinishedRunError, atomic_dir, digest, read_jsonl, replacing, write_json, write_jsonl
from .data import Pair, collate, response_loss
from .distributed import rank_and_world
from .perturbations import METHODS, AdversarialConfig, Cost, Method, RefatConfig, make_perturbation, step_generator

__all__ = ["LoraSettings", "TrainConfig", "TrainResult", "train", "TrainingDivergedError"]

# what a training run writes into its folder; anything else there (cached pairs) is an input --overwrite keeps
_RUN_FILES = ("train_summary.json", "metrics.jsonl", "train_config.json")


class TrainingDivergedError(RuntimeError):
    pass


Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)


@dataclass
class LoraSettings:
    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"  # peft's: module names, or one name/regex/"all-linear"

    def __post_init__(self):
        at_least(self, 1, "r")
        at_least(self, 0, "alpha", strict=True)
        require(0.0 <= self.dropout < 1.0, "dropout", f"must be in [0, 1), got {self.dropout}")
        require(bool(self.target_modules), "target_modules", "empty")


@dataclass
class TrainConfig:
    method: Method = "refat"
    steps: int = 60
    batch_size: int = 4  # global batch: half harmful, half harmless rows
    grad_accum: int = 1
    lr: float = 2e-4
    warmup_steps: int = 4
    schedule: Schedule = "cosine"
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    max_length: int = 160
    full_finetune: bool = False
    lora: LoraSettings = field(default_factory=LoraSettings)
    refat: RefatConfig = field(default_factory=RefatConfig)
    adversarial: AdversarialConfig = field(default_factory=AdversarialConfig)
    seed: int = 0
    checkpoint_every: int = 20
    merge: bool = False  # also write a merged checkpoint plain transformers can load

    def __post_init__(self):
        require(self.method in METHODS, "method", f"unknown training method {self.method!r}; "
                f"choose from {', '.join(METHODS)}")
        require(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        at_least(self, 1, "steps", "grad_accum", "max_length", "checkpoint_every")
        require(self.batch_size >= 2, "batch_size", f"must be >= 2 (one harmful and one harmless row), "
                f"got {self.batch_size}")
        at_least(self, 0, "warmup_steps", "weight_decay")
        at_least(self, 0, "lr", "max_grad_norm", strict=True)

    def validate(self, n_layers: int) -> None:
        """The checks that need the model (layer indices), named as ``refat.layers`` / ``adversarial.layers``."""
        for name in ("refat", "adversarial"):
            try:
                getattr(self, name).validate(n_layers)
            except FieldError as e:
                raise FieldError(f"{name}.{e.field}", e.message) from e

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed (the step count may grow)."""
        d = asdict(self)
        d.pop("steps"), d.pop("checkpoint_every"), d.pop("merge")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class TrainResult:
    model: Model  # the trained model (adapters active, or merged when config.merge)
    out_dir: Path
    final_loss: float
    compute: dict


def _lr_lambda(cfg: TrainConfig):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return max(0.0, 1 - frac) if cfg.schedule == "linear" else 0.5 * (1 + math.cos(math.pi * min(frac, 1.0)))
    return f


class _Sampler:
    """Batch for (step, micro): each half drawn from its own per-epoch permutation of (seed, epoch)."""

    def __init__(self, pairs: list[Pair], cfg: TrainConfig):
        self.harmful = [p for p in pairs if p.harmful]
        self.harmless = [p for p in pairs if not p.harmful]
        if not self.harmful or not self.harmless:
            raise ValueError("training needs both harmful (refusal) and harmless (answer) pairs")
        self.n_harmful = (cfg.batch_size + 1) // 2
        self.n_harmless = cfg.batch_size // 2
        self.cfg = cfg

    def _take(self, pool: list[Pair], start: int, n: int, salt: int) -> list[Pair]:
        out = []
        for i in range(start, start + n):
            epoch, j = divmod(i, len(pool))
            perm = torch.randperm(len(pool), generator=step_generator(self.cfg.seed, epoch, salt))
            out.append(pool[perm[j]])
        return out

    def pairs(self, draw: int) -> list[Pair]:
        return (self._take(self.harmful, draw * self.n_harmful, self.n_harmful, 10)
                + self._take(self.harmless, draw * self.n_harmless, self.n_harmless, 11))


def _prepare_model(model: Model, cfg: TrainConfig) -> Model:
    """Make the model trainable: LoRA adapters through peft (a new Model view), or every weight."""
    if cfg.full_finetune:
        model.hf.requires_grad_(True)
        model.hf.train()
        return model
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    hf = get_peft_model(model.hf, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                             target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    hf.train()
    trained = wrap(hf, model.tokenizer, name=model.name, system_prompt=model.system_prompt,
                   max_prompt_tokens=model.max_prompt_tokens)
    trained.source = model.source
    return trained


def _trainable(model: Model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in model.hf.named_parameters() if p.requires_grad}


def _checkpoints(out: Path) -> list[Path]:
    return sorted((out / "checkpoints").glob("step-*[0-9]"))


def _fingerprint(model: Model, pairs: list[Pair], cfg: TrainConfig) -> dict:
    """What must match for a checkpoint to be resumed: the base model's identity, the training pairs and the
    training config (whose step count may grow)."""
    return {"model": identity(model), "pairs": digest([asdict(p) for p in pairs]), "config": cfg.fingerprint()}


def _check_resume(path: Path, stored: dict, now: dict) -> None:
    """Refuse a checkpoint whose model, pairs or config differ from this run's, naming which."""
    labels = {"model": "model", "pairs": "training pairs", "config": "training config"}

    def show(key: str, value) -> str:
        return "not recorded" if value is None else describe_identity(value) if key == "model" else value

    diffs = [f"{labels[key]} ({show(key, stored.get(key))} there, {show(key, value)} now)"
             for key, value in now.items() if stored.get(key) != value]
    if diffs:
        hint = " (only --steps may change)" if stored.get("config") != now["config"] else ""
        raise ValueError(f"{path} was written with a different {' and a different '.join(diffs)}: resume with the "
                         f"same model, data and options{hint}, or pass --overwrite, or start a new --out")


def _save_checkpoint(out: Path, step: int, model: Model, opt, sched, perturbation, fingerprint: dict, cost: dict,
                     loss: float = float("nan")) -> Path:
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"step-{step:06d}"
    with atomic_dir(final) as tmp:
        save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()},
                  str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(),
                    "perturbation": perturbation.state()}, tmp / "state.pt")
        write_json(tmp / "state.json", {"step": step, "fingerprint": fingerprint, "compute": cost, "loss": loss,
                                        "perturbation_history": getattr(perturbation, "history", [])})
    return final


def _load_checkpoint(path: Path, model: Model, opt, sched, perturbation, cfg: TrainConfig,
                     fingerprint: dict) -> tuple[int, dict, float]:
    from safetensors.torch import load_file

    info = json.loads((path / "state.json").read_text())
    stored = info["fingerprint"] if isinstance(info["fingerprint"], dict) else {"config": info["fingerprint"]}
    _check_resume(path, stored, fingerprint)
    params = _trainable(model)
    for name, t in load_file(str(path / "trainable.safetensors")).items():
        params[name].data.copy_(t)
    state = torch.load(path / "state.pt", weights_only=True)  # our own file; no arbitrary unpickling
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    schedule = _lr_lambda(cfg)  # the saved lr came from the saved run's step count, which a resume may raise
    for group, base in zip(opt.param_groups, sched.base_lrs):
        group["lr"] = base * schedule(sched.last_epoch)
    torch.set_rng_state(state["torch_rng"])
    perturbation.load_state(state["perturbation"])
    if hasattr(perturbation, "history"):
        perturbation.history = info.get("perturbation_history", [])
    compute = dict(info["compute"])
    perturbation.cost = Cost(**compute.pop("perturbation", {}))  # the summary counts the whole run's extra work
    return info["step"], compute, info.get("loss", float("nan"))  # loss of the checkpoint's last step


def train(model: Model, pairs: list[Pair], cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False,
          overwrite: bool = False, progress: bool = True) -> TrainResult:
    """Fine-tune ``model`` with ``cfg.method``; checkpoints, metrics and the adapter go to ``out_dir``.

    ``resume``: continue the checkpoints in ``out_dir``, refused when they were made with another model, other
    pairs or another config. ``overwrite``: a fresh run written beside ``out_dir`` that replaces the run's own
    outputs only when it finishes (other files, such as cached pairs, are kept)."""
    cfg.validate(model.n_layers)
    sampler = _Sampler(pairs, cfg)  # checks the pairs before anything is written
    out = Path(out_dir)
    rank, world = rank_and_world()
    if overwrite:
        keep = [p.name for p in out.iterdir() if p.is_file() and p.name not in _RUN_FILES
                and not p.name.startswith(".")] if out.is_dir() else []
        with replacing(out, keep=keep, main=rank == 0) as fresh:
            result = train(model, pairs, cfg, fresh, progress=progress)
        result.out_dir = out
        return result
    if (out / "train_summary.json").exists() and not resume:
        raise FinishedRunError(f"{out} holds a finished training run; pass --overwrite or --resume, or another --out")
    fingerprint = _fingerprint(model, pairs, cfg)
    torch.manual_seed(cfg.seed)
    model = _prepare_model(model, cfg)
    params = list(_trainable(model).values())
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))
    perturbation = make_perturbation(cfg.method, model, refat=cfg.refat, adversarial=cfg.adversarial,
                                     harmful=[p.prompt for p in sampler.harmful],
                                     harmless=[p.prompt for p in sampler.harmless], seed=cfg.seed)
    forward_model = model.hf
    if world > 1:
        forward_model = torch.nn.parallel.DistributedDataParallel(model.hf)
    start, compute = 0, {"train_forward": 0, "train_backward": 0, "train_tokens": 0, "train_target_tokens": 0,
                         "seconds": 0.0}  # target tokens: those the loss (and the vocabulary projection) sees
    loss_value = float("nan")
    ckpts = _checkpoints(out)
    if resume and ckpts:
        check_resumable(model, ckpts[-1])
        start, compute, loss_value = _load_checkpoint(ckpts[-1], model, opt, sched, perturbation, cfg, fingerprint)
        print(f"refat: resuming {cfg.method} from {ckpts[-1]} (step {start})", file=sys.stderr)
    elif ckpts:
        raise FinishedRunError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite")
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", asdict(cfg))
        kept = [r for r in read_jsonl(metrics_path) if r["step"] < start] if metrics_path.exists() else []
        write_jsonl(metrics_path, kept)
    bar = tqdm(total=cfg.steps, initial=start, desc=f"training ({cfg.method})", disable=not progress or rank != 0)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        perturbation.before_step(step)
        release_freed_memory()  # e.g. the feature recomputation's buffers, before the step's peak
        loss_value = 0.0
        for micro in range(cfg.grad_accum):
            draw = step * cfg.grad_accum + micro
            full = collate(model, sampler.pairs(draw), cfg.max_length, with_affirmative=cfg.method in ("cat", "lat"))
            n_target = int((full.labels[:, 1:] != -100).sum())
            batch = full.select(torch.arange(rank, len(full.harmful), world)) if world > 1 else full
            batch = batch.to(model.device)
            with perturbation.context(batch, draw):
                token_loss = response_loss(model, batch.input_ids, batch.attention_mask, batch.labels,
                                           forward=forward_model)
            loss = token_loss / n_target / cfg.grad_accum * world  # DDP averages over ranks: undo it
            finite = torch.tensor([float(torch.isfinite(loss))])
            if world > 1:  # every rank stops together (a rank raising alone would leave the others hanging)
                torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
            if not finite.item():
                last = _checkpoints(out)
                raise TrainingDivergedError(
                    f"non-finite loss ({loss.item()} on this rank) at step {step}; stopped without saving. "
                    f"Last good checkpoint: {last[-1] if last else 'none'}. Lower --lr or check the data.")
            loss.backward()
            loss_value += loss.item() / world
            compute["train_forward"] += 1
            compute["train_backward"] += 1
            compute["train_tokens"] += batch.n_tokens
            compute["train_target_tokens"] = compute.get("train_target_tokens", 0) + int(batch.labels[:, 1:].ne(-100).sum())
        if world > 1:
            total = torch.tensor([loss_value])
            torch.distributed.all_reduce(total)
            loss_value = total.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm).item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        release_freed_memory()
        dt = time.perf_counter() - t0
        compute["seconds"] += dt
        row = {"step": step, "loss": loss_value, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
               "seconds": round(dt, 3)}
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{row['lr']:.1e}", s_per_step=f"{dt:.1f}")
            bar.update(1)
        done = step + 1
        if rank == 0 and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save_checkpoint(out, done, model, opt, sched, perturbation, fingerprint,
                             compute | {"perturbation": asdict(perturbation.cost)}, loss_value)
        if world > 1:
            torch.distributed.barrier()
    bar.close()
    compute["perturbation"] = asdict(perturbation.cost)
    saved = out / ("model" if cfg.full_finetune else "adapter")
    if rank == 0:
        _save_model(model, saved)
        # the trained model is not its base: its identity gains the saved weights' (path-free) fingerprint
        model.source = {**model.source, "trained": files_sha256(model_files(saved))}
    if cfg.merge and not cfg.full_finetune:
        source = model.source
        model = wrap(model.hf.merge_and_unload(), model.tokenizer, name=model.name,
                     system_prompt=model.system_prompt, max_prompt_tokens=model.max_prompt_tokens)
        model.source = source
        if rank == 0:
            _save_model(model, out / "merged")
    if rank == 0:  # last: its presence marks the run finished
        write_json(out / "train_summary.json", {
            "method": cfg.method, "steps": cfg.steps, "world_size": world, "final_loss": loss_value, "compute": compute,
            "direction_history": getattr(perturbation, "history", []), "model": model.name,
            "model_source": model.source})
    model.hf.eval()
    return TrainResult(model, out, loss_value, compute)


def _save_model(model: Model, path: Path) -> None:
    with atomic_dir(path) as tmp:
        model.hf.save_pretrained(tmp)
        model.tokenizer.save_pretrained(tmp)
