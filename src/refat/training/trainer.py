"""One trainer for every method: LoRA (or full) fine-tuning on refusal/answer pairs, with the
method's perturbation around the harmful rows' forward pass, resumable checkpoints, compute
accounting and optional data parallelism (``torchrun``/``accelerate launch``, gloo or nccl).
The loss is one cross-entropy over every response token, or, for CAT and LAT configured so, their
authors' weighted terms (:mod:`refat.training.objective`).

The loop runs through ``accelerate.Accelerator``: one device per process, DDP when launched data
parallel, FSDP2 for sharded full fine-tuning (``fsdp.py``), mixed precision (bf16 on GPUs, none on CPU),
gradient accumulation, and the trackers of ``report_to`` (TensorBoard, W&B, Trackio...) beside
``metrics.jsonl``. DeepSpeed is refused with a clear error.

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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Literal, get_args

import torch
from tqdm.auto import tqdm

from ..configs import ConfigError, FieldError, added, at_least, fingerprint_data, require
from ..errors import InputError, RunError
from ..memory import release_freed_memory
from ..models import Model, check_resumable, describe_identity, files_sha256, identity, model_files, wrap
from ..storage import FinishedRunError, atomic_dir, digest, read_jsonl, replacing, write_json, write_jsonl
from . import fsdp
from .data import Pair, collate, response_loss
from .distributed import rank_and_world
from .objective import objective_loss, term_tokens
from .perturbations import METHODS, AdversarialConfig, Cost, Method, RefatConfig, make_perturbation, step_generator

__all__ = ["LoraSettings", "TrainConfig", "TrainResult", "train", "TrainingDivergedError"]

# what a training run writes into its folder; anything else there (cached pairs) is an input --overwrite keeps
_RUN_FILES = ("train_summary.json", "metrics.jsonl", "train_config.json")


class TrainingDivergedError(RunError):
    pass


Schedule = Literal["cosine", "linear", "constant"]
SCHEDULES: tuple[str, ...] = get_args(Schedule)
MixedPrecision = Literal["auto", "no", "bf16", "fp16"]
MIXED_PRECISIONS: tuple[str, ...] = get_args(MixedPrecision)
TRACKERS = ("tensorboard", "wandb", "trackio", "mlflow", "comet_ml", "aim", "clearml", "dvclive", "swanlab")


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
    batch_size: int = 4  # global batch: harmful_share harmful rows (rounded up), the rest harmless/borderline rows
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
    mixed_precision: MixedPrecision = "auto"  # auto: bf16 on a GPU that has it, fp16 on older GPUs, no on CPU
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, more time
    report_to: list[str] = field(default_factory=list)  # trackers beside metrics.jsonl: tensorboard, wandb, ...
    harmful_share: float = added(0.5)  # share of each batch's rows that are harmful (CAT's mix: 0.125)

    def __post_init__(self):
        self.report_to = [t for t in self.report_to if t != "none"]
        require(self.mixed_precision in MIXED_PRECISIONS, "mixed_precision", f"must be one of "
                f"{', '.join(MIXED_PRECISIONS)}, got {self.mixed_precision!r}")
        unknown = [t for t in self.report_to if t not in TRACKERS]
        require(not unknown, "report_to", f"unknown tracker(s) {unknown}; choose from {', '.join(TRACKERS)} or none")
        require(self.method in METHODS, "method", f"unknown training method {self.method!r}; "
                f"choose from {', '.join(METHODS)}")
        require(self.schedule in SCHEDULES, "schedule", f"must be one of {', '.join(SCHEDULES)}, got {self.schedule!r}")
        at_least(self, 1, "steps", "grad_accum", "max_length", "checkpoint_every")
        require(self.batch_size >= 2, "batch_size", f"must be >= 2 (one harmful and one harmless row), "
                f"got {self.batch_size}")
        at_least(self, 0, "warmup_steps", "weight_decay")
        at_least(self, 0, "lr", "max_grad_norm", strict=True)
        require(0.0 < self.harmful_share < 1.0, "harmful_share", f"must be in (0, 1), got {self.harmful_share}")
        require(not (self.full_finetune and self.adversarial.kl_weight), "adversarial.kl_weight",
                "the KL term compares with the base model, which LoRA keeps (adapters off); full fine-tuning has none")

    def validate(self, n_layers: int) -> None:
        """The checks that need the model (layer indices), named as ``refat.layers`` / ``adversarial.layers``."""
        for name in ("refat", "adversarial"):
            try:
                if name == "adversarial":
                    self.adversarial.validate(n_layers, self.method if self.method in ("cat", "lat") else None)
                else:
                    self.refat.validate(n_layers)
            except FieldError as e:
                raise FieldError(f"{name}.{e.field}", e.message) from e

    def fingerprint(self) -> str:
        """What must match for a checkpoint to be resumed (the step count may grow; logging and activation
        recomputation change no number). No mixed precision is left out, as checkpoints from before the
        option were written without it, and so is every later option at its default (``configs.added``)."""
        d = fingerprint_data(self)
        for key in ("steps", "checkpoint_every", "merge", "report_to", "gradient_checkpointing"):
            d.pop(key)
        if d["mixed_precision"] == "no":
            d.pop("mixed_precision")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]

    def resolved(self, device: torch.device) -> "TrainConfig":
        """This config with ``mixed_precision: auto`` made concrete for ``device`` (the fingerprint and
        train_config.json carry the concrete value, so a resume on other hardware is refused)."""
        if self.mixed_precision != "auto":
            return self
        mp = "no" if device.type != "cuda" else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return replace(self, mixed_precision=mp)


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
    """Batch for (step, micro): the harmful and the other rows (``harmful_share`` of the batch, rounded up, and
    the rest) each drawn from its own per-epoch permutation of (seed, epoch)."""

    def __init__(self, pairs: list[Pair], cfg: TrainConfig):
        self.harmful = [p for p in pairs if p.harmful]
        self.harmless = [p for p in pairs if not p.harmful]
        if not self.harmful or not self.harmless:
            raise InputError("training needs both harmful (refusal) and harmless (answer) pairs")
        # harmful_share 0.5: (batch_size + 1) // 2, as before the option existed
        self.n_harmful = min(cfg.batch_size - 1, max(1, math.ceil(cfg.harmful_share * cfg.batch_size - 1e-9)))
        self.n_harmless = cfg.batch_size - self.n_harmful
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
        raise InputError(f"{path} was written with a different {' and a different '.join(diffs)}: resume with the "
                         f"same model, data and options{hint}, or pass --overwrite, or start a new --out")


def _save_checkpoint(out: Path, step: int, model: Model, opt, sched, perturbation, fingerprint: dict, cost: dict,
                     loss: float = float("nan"), *, acc=None) -> Path:
    """Rank 0 writes the checkpoint; under FSDP (``acc`` sharded) every process calls this and writes its
    shards of the weights and optimizer state into the folder rank 0 prepares."""
    from safetensors.torch import save_file

    final = out / "checkpoints" / f"step-{step:06d}"
    shard = acc is not None and fsdp.sharded(acc)
    main = rank_and_world()[0] == 0
    with atomic_dir(final, main=main) as tmp:
        state = {"scheduler": sched.state_dict(), "torch_rng": torch.get_rng_state(), "perturbation": perturbation.state()}
        if shard:
            acc.wait_for_everyone()  # rank 0 has made the folder
            fsdp.save_state(acc, model.hf, opt, tmp / fsdp.STATE_DIR)
            acc.wait_for_everyone()  # every shard is written before rank 0 moves the folder into place
        else:
            save_file({n: p.detach().contiguous().cpu() for n, p in _trainable(model).items()},
                      str(tmp / "trainable.safetensors"))
            state["optimizer"] = opt.state_dict()
        if main:
            torch.save(state, tmp / "state.pt")
            write_json(tmp / "state.json", {"step": step, "fingerprint": fingerprint, "compute": cost, "loss": loss,
                                            "perturbation_history": getattr(perturbation, "history", [])})
    return final


def _load_checkpoint(path: Path, model: Model, opt, sched, perturbation, cfg: TrainConfig,
                     fingerprint: dict, *, acc=None) -> tuple[int, dict, float]:
    """Every process reads the checkpoint (under FSDP, each its own shards)."""
    from safetensors.torch import load_file

    info = json.loads((path / "state.json").read_text())
    stored = info["fingerprint"] if isinstance(info["fingerprint"], dict) else {"config": info["fingerprint"]}
    _check_resume(path, stored, fingerprint)
    shard = acc is not None and fsdp.sharded(acc)
    written_sharded = (path / fsdp.STATE_DIR).is_dir()
    if shard != written_sharded:
        raise InputError(f"{path} was written by a {'' if written_sharded else 'non-'}sharded run and this one is "
                         f"{'' if shard else 'not '}sharded (FSDP): resume it with the accelerate config it was "
                         "started with, or pass --overwrite")
    state = torch.load(path / "state.pt", weights_only=True)  # our own file; no arbitrary unpickling
    if shard:
        fsdp.load_state(acc, model.hf, opt, path / fsdp.STATE_DIR)
    else:
        params = _trainable(model)
        for name, t in load_file(str(path / "trainable.safetensors")).items():
            params[name].data.copy_(t)
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
    outputs only when it finishes (other files, such as cached pairs, are kept).

    Launched sharded (FSDP, full fine-tuning) the returned model stays sharded over the processes, so each
    of its forwards needs all of them; the saved ``model`` folder holds the whole trained model."""
    cfg.validate(model.n_layers)
    cfg = cfg.resolved(model.device)
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
    if cfg.gradient_checkpointing:  # non-reentrant: no input gradients needed, and the block hooks re-run
        model.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    acc = _accelerator(cfg, model, out)
    base_dtype = model.dtype  # FSDP under mixed precision keeps fp32 master weights; the saved model keeps this
    opt = torch.optim.AdamW(list(_trainable(model).values()), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg))  # stepped by us: once per step, any world
    forward_model, opt = acc.prepare(model.hf, opt)
    params = list(_trainable(model).values())  # after prepare: FSDP replaced them by their shards
    _check_blocks_inside(model, forward_model)
    perturbation = make_perturbation(cfg.method, model, refat=cfg.refat, adversarial=cfg.adversarial,
                                     harmful=[p.prompt for p in sampler.harmful],
                                     harmless=[p.prompt for p in sampler.harmless], seed=cfg.seed)
    start, compute = 0, {"train_forward": 0, "train_backward": 0, "train_tokens": 0, "train_target_tokens": 0,
                         "seconds": 0.0}  # target tokens: those the loss (and the vocabulary projection) sees
    loss_value = float("nan")
    ckpts = _checkpoints(out)
    if resume and ckpts:
        check_resumable(model, ckpts[-1])
        start, compute, loss_value = _load_checkpoint(ckpts[-1], model, opt, sched, perturbation, cfg, fingerprint,
                                                      acc=acc)
        print(f"refat: resuming {cfg.method} from {ckpts[-1]} (step {start})", file=sys.stderr)
    elif ckpts:
        raise FinishedRunError(f"{out} holds checkpoints of an earlier run; pass --resume to continue it or --overwrite")
    metrics_path = out / "metrics.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "train_config.json", asdict(cfg))
        kept = [r for r in read_jsonl(metrics_path) if r["step"] < start] if metrics_path.exists() else []
        write_jsonl(metrics_path, kept)
    if cfg.report_to:
        acc.init_trackers(cfg.method, config=_flat(asdict(cfg)))
    weighted = cfg.method in ("cat", "lat") and cfg.adversarial.weighted
    bar = tqdm(total=cfg.steps, initial=start, desc=f"training ({cfg.method})", disable=not progress or rank != 0)
    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        with acc.autocast():  # the perturbation's own forwards run in the training forward's precision
            perturbation.before_step(step)
        release_freed_memory()  # e.g. the feature recomputation's buffers, before the step's peak
        loss_value, parts = 0.0, {}
        for micro in range(cfg.grad_accum):
            draw = step * cfg.grad_accum + micro
            full = collate(model, sampler.pairs(draw), cfg.max_length, with_affirmative=cfg.method in ("cat", "lat"))
            n_target = int((full.labels[:, 1:] != -100).sum())
            batch = full.select(torch.arange(rank, len(full.harmful), world)) if world > 1 else full
            batch = batch.to(model.device)
            with acc.accumulate(forward_model):  # DDP syncs gradients on the last micro-batch only
                if weighted:  # CAT's / LAT's own objective: weighted terms, each a mean over its tokens
                    loss, value, micro_parts, extra = objective_loss(
                        model, forward_model, batch, perturbation, cfg.adversarial, term_tokens(full), world,
                        draw, acc.autocast)
                    for k, v in micro_parts.items():
                        parts[k] = parts.get(k, 0.0) + v / cfg.grad_accum
                    compute["train_forward"] += extra["forward"]
                    compute["train_tokens"] += extra["tokens"]
                    compute["train_target_tokens"] = compute.get("train_target_tokens", 0) + extra["target_tokens"]
                else:
                    with acc.autocast(), perturbation.context(batch, draw):
                        token_loss = response_loss(model, batch.input_ids, batch.attention_mask, batch.labels,
                                                   forward=forward_model)
                    # accelerate divides by grad_accum in backward; DDP averages over ranks: undo it
                    loss = token_loss.float() / n_target * world
                finite = torch.tensor([float(torch.isfinite(loss))])
                if world > 1:  # every rank stops together (a rank raising alone would leave the others hanging)
                    torch.distributed.all_reduce(finite, op=torch.distributed.ReduceOp.MIN)
                if not finite.item():
                    last = _checkpoints(out)
                    raise TrainingDivergedError(
                        f"non-finite loss ({loss.item()} on this rank) at step {step}; stopped without saving. "
                        f"Last good checkpoint: {last[-1] if last else 'none'}. Lower --lr or check the data.")
                acc.backward(loss)
            loss_value += (value if weighted else loss.item()) / world / cfg.grad_accum
            compute["train_forward"] += 1
            compute["train_backward"] += 1
            compute["train_tokens"] += batch.n_tokens
            compute["train_target_tokens"] = compute.get("train_target_tokens", 0) + int(batch.labels[:, 1:].ne(-100).sum())
        if world > 1:
            total = torch.tensor([loss_value])
            torch.distributed.all_reduce(total)
            loss_value = total.item()
        grad_norm = fsdp.scalar(acc.clip_grad_norm_(params, cfg.max_grad_norm))
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        release_freed_memory()
        dt = time.perf_counter() - t0
        compute["seconds"] += dt
        row = {"step": step, "loss": loss_value, "lr": sched.get_last_lr()[0], "grad_norm": grad_norm,
               "seconds": round(dt, 3)} | _drift(perturbation, step) | parts
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")
            if cfg.report_to:
                acc.log(_tracked(row, compute, perturbation.cost), step=step)
            bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{row['lr']:.1e}", s_per_step=f"{dt:.1f}")
            bar.update(1)
        done = step + 1
        if (rank == 0 or fsdp.sharded(acc)) and (done % cfg.checkpoint_every == 0 or done == cfg.steps):
            _save_checkpoint(out, done, model, opt, sched, perturbation, fingerprint,
                             compute | {"perturbation": asdict(perturbation.cost)}, loss_value, acc=acc)
        if world > 1:
            torch.distributed.barrier()
    bar.close()
    for tracker in acc.trackers:  # not acc.end_training(): it would end the process group the caller may still use
        tracker.finish()
    model.hf = acc.unwrap_model(forward_model, keep_fp32_wrapper=False)  # the plain forward, autocast removed
    compute["perturbation"] = asdict(perturbation.cost)
    saved = out / ("model" if cfg.full_finetune else "adapter")
    weights = fsdp.full_state_dict(acc, forward_model, base_dtype) if fsdp.sharded(acc) else None  # every rank
    if rank == 0:
        _save_model(model, saved, weights)
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


def _accelerator(cfg: TrainConfig, model: Model, out: Path):
    """The Accelerator of this process: on the model's device (each process its own GPU, see
    ``models.auto_device``), DDP when launched data parallel, FSDP2 when launched sharded (full
    fine-tuning only, see ``fsdp.check``)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    acc = Accelerator(cpu=model.device.type == "cpu", mixed_precision=cfg.mixed_precision,
                      gradient_accumulation_steps=cfg.grad_accum, device_placement=False,
                      log_with=cfg.report_to or None, project_dir=out / "trackers")
    if acc.distributed_type not in (DistributedType.NO, DistributedType.MULTI_CPU, DistributedType.MULTI_GPU,
                                    DistributedType.FSDP):
        raise ConfigError(f"accelerate is configured for {acc.distributed_type.value}; refat's trainer runs data "
                          "parallel (DDP) or sharded (FSDP2): launch with configs/accelerate/ddp.yaml or fsdp.yaml, "
                          "or torchrun")
    world = rank_and_world()[1]
    fsdp.check(acc, cfg, world)
    if acc.num_processes != world:  # e.g. a process forked after accelerate's state was set up alone
        raise RuntimeError(f"accelerate's state is set up for {acc.num_processes} process(es) but WORLD_SIZE is "
                           f"{world}; create no Accelerator before the process group is started")
    if (acc.device.type, acc.device.index or 0) != (model.device.type, model.device.index or 0):
        raise ValueError(f"the model is on {model.device} but this process trains on {acc.device}: load it with "
                         "the default device (each process its own GPU) or the same --device")
    return acc


def _check_blocks_inside(model: Model, prepared: torch.nn.Module) -> None:
    """The perturbations hook ``model.blocks``: they must be the blocks the prepared model runs."""
    inside = {id(m) for m in prepared.modules()}
    if not all(id(b) in inside for b in model.blocks):
        raise RuntimeError("the prepared model does not run the decoder blocks the perturbation hooks; "
                           "a wrapper replaced them")


def _drift(perturbation, step: int) -> dict:
    """ReFAT's feature drift when the features were recomputed at ``step``: their mean norm, and their
    cosine to the previous features (none the first time)."""
    last = (getattr(perturbation, "history", None) or [{}])[-1]
    if last.get("step") != step:
        return {}
    out = {"feature_norm": last["mean_norm"]}
    if last["cosine_to_previous"] is not None:
        out["feature_cosine"] = last["cosine_to_previous"]
    return out


def _tracked(row: dict, compute: dict, extra: Cost) -> dict:
    """What the trackers get per step: the metrics row and the running compute counters."""
    counters = {f"compute/{k}": v for k, v in compute.items() if k != "seconds"}
    counters |= {f"compute/perturbation_{k}": v for k, v in asdict(extra).items() if k != "seconds"}
    return {k: v for k, v in row.items() if k != "step"} | counters


def _flat(d: dict, prefix: str = "") -> dict:
    """A nested config as flat scalars (trackers' hyperparameter tables take no lists or None)."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v if isinstance(v, (int, float, str, bool)) else str(v)
    return out


def _save_model(model: Model, path: Path, state_dict: dict | None = None) -> None:
    """``state_dict``: the weights to write when the model's own are sharded (FSDP)."""
    with atomic_dir(path) as tmp:
        model.hf.save_pretrained(tmp, **({} if state_dict is None else {"state_dict": state_dict}))
        model.tokenizer.save_pretrained(tmp)
