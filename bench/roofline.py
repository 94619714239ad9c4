"""Achieved FLOP/s of a forward pass and of a LoRA training step, against the machine's matmul peak.

Peak: the best time of ``torch.matmul`` on two ``n x n`` matrices in the model's dtype (2·n³ FLOP),
with the thread count everything else uses. FLOPs of the model are counted analytically, over real
(non-padding) tokens only, so padding, norms, softmax, the loss and the optimizer are uncounted work
and the ratios are conservative:

- forward (``forward_last_logits``, batch of B prompts, t_i tokens each, N = Σ t_i):
  F = 2·P_blocks·N + 2·P_head·B + 4·L·d_attn·Σ t_i²
  (P_blocks: every 2-D weight inside the transformer blocks; the vocabulary projection runs at the last
  position only; the attention scores and their weighted sum, QKᵀ and AV, are 2·t²·d_attn each per layer).
- LoRA step (refusal training, no perturbation; logits at the M positions that predict a response
  token): forward F_f = 2·P_blocks·N + 2·P_head·M + 2·P_lora·N + 4·L·d_attn·Σ t_i², and the backward
  computes gradients of the activations through every frozen weight (1x their forward FLOPs, no
  weight gradients), of the attention (2x) and of the adapters (activations and weights, 2x):
  F_step = 2·[2·P_blocks·N + 2·P_head·M] + 3·[2·P_lora·N] + 3·[4·L·d_attn·Σ t_i²],
  with Σ t_i² estimated from the mean row length (the trainer does not report per-row lengths).
"""

from __future__ import annotations

import copy
import statistics
import tempfile
import time

import torch

from refat.generation import forward_last_logits
from refat.models import Model, wrap
from refat.storage import read_jsonl
from refat.training import TrainConfig, train

from .common import PROMPTS, offline_pairs, row


def matmul_params(model: Model) -> tuple[int, int]:
    """(P_blocks, P_head): 2-D weights inside the blocks (Linear or GPT-2's Conv1D) and the vocabulary projection."""
    blocks = sum(p.numel() for b in model.blocks for p in b.parameters() if p.dim() == 2)
    head = model.hf.get_output_embeddings()
    return blocks, (head.weight.numel() if head is not None else 0)


def attention_width(model: Model) -> int:
    """Heads x head dimension of the queries (what QKᵀ and AV contract over)."""
    cfg = model.hf.config
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    head_dim = getattr(cfg, "head_dim", None)
    return int(heads * head_dim) if heads and head_dim else model.d_model


def forward_flops(model: Model, lengths: list[int]) -> float:
    blocks, head = matmul_params(model)
    n = sum(lengths)
    return 2 * blocks * n + 2 * head * len(lengths) + 4 * model.n_layers * attention_width(model) * sum(t * t for t in lengths)


def lora_step_flops(model: Model, tokens: float, rows: int, lora_params: int, targets: float | None = None) -> float:
    """``targets``: positions projected onto the vocabulary (the response tokens; default every token)."""
    blocks, head = matmul_params(model)
    targets = tokens if targets is None else targets
    mean_len = tokens / rows
    attn = 4 * model.n_layers * attention_width(model) * rows * mean_len ** 2
    return 2 * (2 * blocks * tokens + 2 * head * targets) + 3 * (2 * lora_params * tokens) + 3 * attn


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, trials: int = 5) -> float:
    """Best FLOP/s of ``trials`` n x n matmuls (after one untimed call)."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(trials):
        sync()
        t0 = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def run(model: Model, repeats: int = 3, batch_size: int = 16, train_steps: int = 2, train_batch: int = 4,
        matmul_n: int = 2048) -> tuple[list[dict], dict]:
    """Rounds of (matmul peak, forward, LoRA run of ``train_steps`` steps), interleaved; each LoRA run gives its
    mean seconds per step, without its first step (lazy allocations) when there are more."""
    prompts = (PROMPTS * (batch_size // len(PROMPTS) + 1))[:batch_size]
    enc = model.tokenize(prompts)
    lengths = enc["attention_mask"].sum(1).tolist()
    pairs = offline_pairs()

    def forward() -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            forward_last_logits(model, enc)
            return time.perf_counter() - t0

    def lora_run() -> tuple[dict, int]:  # peft edits the model it wraps: train a copy
        fresh = wrap(copy.deepcopy(model.hf), model.tokenizer, name=model.name, system_prompt=model.system_prompt)
        cfg = TrainConfig(method="rt", steps=train_steps, batch_size=train_batch, checkpoint_every=10**9)
        with tempfile.TemporaryDirectory() as out:
            result = train(fresh, pairs, cfg, out, progress=False)
            metrics = read_jsonl(f"{out}/metrics.jsonl")
        lora = sum(p.numel() for p in result.model.hf.parameters() if p.requires_grad)
        total = result.compute["seconds"]  # unrounded; metrics.jsonl rounds each step to milliseconds
        if train_steps > 1:
            total -= metrics[0]["seconds"]
        timed = max(1, train_steps - 1)
        return {"seconds": total / timed, "tokens": result.compute["train_tokens"] / train_steps,
                "targets": result.compute["train_target_tokens"] / train_steps}, lora

    peaks, fwd_s, steps = [], [], []
    matmul_peak(min(matmul_n, 256), model.dtype, model.device, trials=1)
    forward()  # warm-up
    lora = 0
    for _ in range(repeats):
        peaks.append(matmul_peak(matmul_n, model.dtype, model.device))
        fwd_s.append(forward())
        per_step, lora = lora_run()
        steps.append(per_step)
    peak = max(peaks)
    fwd = forward_flops(model, lengths) / statistics.median(fwd_s)
    step_s = statistics.median(s["seconds"] for s in steps)
    tokens = statistics.median(s["tokens"] for s in steps)
    targets = statistics.median(s["targets"] for s in steps)
    step_flops = lora_step_flops(model, tokens, train_batch, lora, targets)
    lora_fs = step_flops / step_s
    rows = [
        row(f"roofline: matmul peak GFLOP/s ({matmul_n}x{matmul_n}, {str(model.dtype).removeprefix('torch.')})",
            peak / 1e9),
        row(f"roofline: forward (bs={batch_size}) achieved/peak FLOP/s", fwd / peak),
        row(f"roofline: LoRA step (rt, batch {train_batch}) achieved/peak FLOP/s", lora_fs / peak),
    ]
    blocks, head = matmul_params(model)
    details = {"matmul_n": matmul_n, "peak_flops": peak, "peaks": peaks, "threads": torch.get_num_threads(),
               "params": {"blocks_2d": blocks, "head": head, "lora": lora, "attention_width": attention_width(model),
                          "n_layers": model.n_layers},
               "forward": {"batch_size": batch_size, "lengths": lengths, "flops": forward_flops(model, lengths),
                           "times_s": fwd_s, "achieved_flops": fwd},
               "lora_step": {"batch_size": train_batch, "steps_per_run": train_steps, "tokens_per_step": tokens, "target_tokens_per_step": targets,
                             "flops": step_flops, "times_s": [s["seconds"] for s in steps], "achieved_flops": lora_fs},
               "repeats": repeats, "formulas": __doc__}
    return rows, details
