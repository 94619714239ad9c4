"""GCG with probe sampling (Zhao et al. 2024): a 0.5B draft screens the candidates of a 1.5B target.

Refat's GCG runs the same behaviour, seed and settings without and with probe sampling, interleaved
(``rounds`` times, the order alternating); nanoGCG 0.3.0 runs with its own probe sampling at the same
settings when its virtualenv can be made (bench/gcg_vs_nanogcg.py). Reported: seconds per step of each,
the candidates the target scored per step (an exact count), the rank agreement of draft and target, and
the best losses. A 1.5B GCG step takes minutes on CPU: this case runs only with ``--only probe``.

    python -m bench --only probe                              # qwen2.5-coder-1.5b target, 0.5b draft
    python -m bench --only probe --probe-target T --probe-draft D --gcg-steps 3
"""

from __future__ import annotations

import statistics
import subprocess
from pathlib import Path

from refat.attacks.gcg import GCG, GCGConfig, ProbeSamplingConfig
from refat.models import load

from . import gcg_vs_nanogcg
from .common import row

TARGET_MODEL, DRAFT_MODEL = "qwen2.5-coder-1.5b", "qwen2.5-coder-0.5b"


def _ours(target, cfg: GCGConfig, draft, goal: str, target_str: str) -> dict:
    res = GCG(target, cfg, progress=False, draft=draft).attack(goal, target_str)
    return {"step_seconds": res.step_seconds, "losses": res.losses, "best_loss": res.best_loss,
            "target_scored": res.target_scored, "probe_agreement": res.probe_agreement,
            "draft_forward": res.n_draft_forward, "forward": res.n_forward}


def run(target_spec: str = TARGET_MODEL, draft_spec: str = DRAFT_MODEL, *, steps: int = 2, search_width: int = 128,
        topk: int = 256, rounds: int = 1, seed: int = 0, dtype: str = "float32", device: str | None = None,
        goal: str = gcg_vs_nanogcg.GOAL, target_str: str = gcg_vs_nanogcg.TARGET,
        optim_str_init: str = GCGConfig.optim_str_init, target=None, draft=None) -> tuple[list[dict], dict]:
    """``target``/``draft``: already-loaded models of the two specs (else loaded here)."""
    target = target or load(target_spec, dtype=dtype, device=device)
    draft = draft or load(draft_spec, dtype=dtype, device=device)
    ps = ProbeSamplingConfig()  # nanoGCG's defaults: r 8, sampling factor 16
    cfg = GCGConfig(num_steps=steps, search_width=search_width, topk=topk, seed=seed, optim_str_init=optim_str_init)
    runs: dict[str, list[dict]] = {"plain": [], "probe": []}
    for r in range(rounds):
        for name in ("plain", "probe") if r % 2 == 0 else ("probe", "plain"):
            runs[name].append(_ours(target, cfg, draft if name == "probe" else None, goal, target_str))
    med = {k: statistics.median(t for x in v for t in x["step_seconds"]) for k, v in runs.items()}
    scored = {k: statistics.mean(n for x in v for n in x["target_scored"]) for k, v in runs.items()}
    best = {k: min(x["best_loss"] for x in v) for k, v in runs.items()}
    tag = f"({Path(target_spec).name} target, {Path(draft_spec).name} draft, width {search_width})"
    rows = [row(f"probe: refat s/step, plain / probe sampling {tag}", med["plain"] / med["probe"]),
            row("probe: candidates the target scores per step, probe sampling / plain", scored["probe"] / scored["plain"]),
            row("probe: mean draft/target rank agreement (Spearman)",
                statistics.mean(a for x in runs["probe"] for a in x["probe_agreement"])),
            row(f"probe: refat best loss ({steps} steps), plain", best["plain"]),
            row(f"probe: refat best loss ({steps} steps), probe sampling", best["probe"])]
    details = {"target": target_spec, "draft": draft_spec, "steps": steps, "search_width": search_width,
               "topk": topk, "rounds": rounds, "r": ps.r, "sampling_factor": ps.sampling_factor,
               "median_step_seconds": med, "target_scored": scored, "best_loss": best, "runs": runs}
    try:  # nanoGCG's own probe sampling, same settings (its virtualenv needs PyPI once)
        theirs = gcg_vs_nanogcg.run_nanogcg(
            gcg_vs_nanogcg.resolve_model_dir(target_spec), goal=goal, target=target_str, optim_str_init=optim_str_init,
            steps=steps, search_width=search_width, topk=topk, seed=seed, threads=None,
            dtype=str(target.dtype).removeprefix("torch."), device=str(target.device),
            draft_dir=gcg_vs_nanogcg.resolve_model_dir(draft_spec), probe=(ps.r, ps.sampling_factor))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:  # no PyPI, no cached model: still report ours
        details["nanogcg"] = f"not run: {type(e).__name__}: {e}"
    else:
        details["nanogcg"] = theirs
        rows += [row("probe: nanoGCG probe sampling / refat probe sampling, s/step",
                     statistics.median(theirs["step_seconds"]) / med["probe"]),
                 row(f"probe: nanoGCG best loss ({steps} steps), probe sampling", theirs["best_loss"])]
    return rows, details
