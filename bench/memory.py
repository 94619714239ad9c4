"""Peak resident memory of training, measured in a fresh process so the number is that run's alone.

The child (``python -m bench.memory --child ...``) imports refat, loads the model, trains a few steps
of the default (quick) config with the benchmark pairs and reports its peak RSS (VmHWM on Linux) after
the imports, after loading and after training. A peak never decreases, so "after training" is the whole
run's peak.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .common import row

TARGET_GIB = 8.0
ROOT = Path(__file__).resolve().parent.parent  # the child runs `-m bench.memory` from here


def _peak_gib() -> float:
    """This process's peak RSS in GiB: Linux's VmHWM (the peak of this exec's own address space), else ru_maxrss.

    Not ru_maxrss on Linux: a child started by ``subprocess`` inherits its parent's ru_maxrss across exec,
    so it would report the benchmark parent's (model-holding) peak whenever that is larger.
    """
    status = Path("/proc/self/status")
    if status.exists():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 2**20  # kB
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**30 if sys.platform == "darwin" else rss / 2**20  # macOS reports bytes, others KiB


def child(model_spec: str, *, dtype: str, device: str | None, method: str, steps: int, batch_size: int) -> dict:
    """Load, train ``steps`` steps of ``method``; peak RSS (GiB) at each stage."""
    imported = _peak_gib()
    import torch

    from refat.models import load
    from refat.training import TrainConfig, train

    from .common import offline_pairs

    imported = max(imported, _peak_gib())
    t0 = time.perf_counter()
    model = load(model_spec, dtype=dtype, device=device)
    loaded, load_s = _peak_gib(), time.perf_counter() - t0
    cfg = TrainConfig(method=method, steps=steps, batch_size=batch_size, checkpoint_every=10**9)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as out:
        train(model, offline_pairs(), cfg, out, progress=False)
    trained, train_s = _peak_gib(), time.perf_counter() - t0
    return {"peak_gib": {"imports": imported, "loaded": loaded, "trained": trained}, "load_s": load_s,
            "train_s": train_s, "threads": torch.get_num_threads(), "dtype": str(model.dtype).removeprefix("torch."),
            "n_params": sum(p.numel() for p in model.hf.parameters())}


def run(model_spec: str, *, dtype: str = "fp32", device: str | None = None, method: str = "refat", steps: int = 2,
        batch_size: int = 4, timeout: float | None = None) -> tuple[list[dict], dict]:
    """Train in a fresh ``python -m bench.memory --child`` process and report its peak RSS."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "memory.json"
        cmd = [sys.executable, "-m", "bench.memory", "--child", "--model", model_spec, "--dtype", dtype,
               "--method", method, "--steps", str(steps), "--batch-size", str(batch_size), "--out", str(out)]
        if device:
            cmd += ["--device", device]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0:
            raise RuntimeError(f"memory benchmark child failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-3000:]}")
        info = json.loads(out.read_text())
    peak = info["peak_gib"]
    rows = [
        row(f"memory: peak RSS GiB, train {method} {steps} steps (batch {batch_size})", peak["trained"],
            f"< {TARGET_GIB:g}", peak["trained"] < TARGET_GIB),
        row("memory: peak RSS training/after load", peak["trained"] / peak["loaded"]),
    ]
    return rows, info | {"method": method, "steps": steps, "batch_size": batch_size, "model": model_spec}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    p.add_argument("--child", action="store_true", help="be the measured process (else: spawn one and print rows)")
    p.add_argument("--model", required=True, help="catalog name, local directory, .gguf or hub id")
    p.add_argument("--dtype", default="fp32")
    p.add_argument("--device", default=None)
    p.add_argument("--method", default="refat")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--out", default=None, help="JSON output")
    args = p.parse_args(argv)
    from refat.storage import write_json

    kw = dict(dtype=args.dtype, device=args.device, method=args.method, steps=args.steps, batch_size=args.batch_size)
    if args.child:
        result = child(args.model, **kw)
    else:
        rows, result = run(args.model, **kw)
        result = {"results": rows, "details": result}
    if args.out:
        write_json(args.out, result)
    else:
        print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
