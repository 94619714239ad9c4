"""Run nanoGCG 0.3.0 on a local HF directory and write per-step times and losses as JSON.

Runs inside bench/.venv-nanogcg (transformers 4.47.1, which nanoGCG needs); imports nothing from refat.
Directories written by transformers 5 name the RoPE base ``rope_parameters``; 4.47 reads ``rope_theta``,
so it is copied over (without it 4.47 would silently use 10000 and compute another model). The tokenizer
is built straight from ``tokenizer.json`` with the special tokens and chat template of the directory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def load(model_dir: Path, dtype: str, device: str = "cpu"):
    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

    cfg = json.loads((model_dir / "tokenizer_config.json").read_text()) if (model_dir / "tokenizer_config.json").exists() else {}
    specials = {k: cfg[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token") if isinstance(cfg.get(k), str)}
    tok = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"), **specials)
    jinja = model_dir / "chat_template.jinja"
    tok.chat_template = jinja.read_text() if jinja.exists() else cfg.get("chat_template")
    config = AutoConfig.from_pretrained(model_dir)
    rope = getattr(config, "rope_parameters", None)
    if isinstance(rope, dict):
        if "rope_theta" in rope:
            config.rope_theta = rope["rope_theta"]
        if rope.get("rope_type", "default") != "default":
            config.rope_scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    dt = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]
    model = AutoModelForCausalLM.from_pretrained(model_dir, config=config, torch_dtype=dt).to(device).eval()
    model.requires_grad_(False)
    return model, tok, transformers.__version__


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", required=True, type=Path)
    p.add_argument("--goal", required=True)
    p.add_argument("--target", required=True)
    p.add_argument("--optim-str-init", required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--search-width", type=int, required=True)
    p.add_argument("--topk", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--draft-model-dir", type=Path, default=None, help="probe sampling's draft model (off without it)")
    p.add_argument("--probe-r", type=int, default=8)
    p.add_argument("--probe-sampling-factor", type=int, default=16)
    args = p.parse_args()

    import logging

    import nanogcg
    import torch
    from nanogcg import gcg as ngcg

    if args.threads:
        torch.set_num_threads(args.threads)
    model, tok, tf_version = load(args.model_dir, args.dtype, args.device)
    messages = [{"role": "user", "content": f"{args.goal} {{optim_str}}"}]

    # nanoGCG's own split, to let the caller check both sides optimise the same tokens
    template = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    if tok.bos_token and template.startswith(tok.bos_token):
        template = template.replace(tok.bos_token, "")
    before, after = template.split("{optim_str}")
    split = {"before_ids": tok([before])["input_ids"][0],
             "after_ids": tok([after], add_special_tokens=False)["input_ids"][0],
             "target_ids": tok([args.target], add_special_tokens=False)["input_ids"][0]}

    marks: list[float] = []  # log_buffer runs once after the buffer init and once at the end of each step
    init: dict = {}
    log_buffer = ngcg.AttackBuffer.log_buffer

    def timed_log(self, tokenizer):
        marks.append(time.perf_counter())
        if len(marks) == 1:
            init["loss"] = float(self.get_lowest_loss())
        return log_buffer(self, tokenizer)

    ngcg.AttackBuffer.log_buffer = timed_log
    probe = None
    if args.draft_model_dir is not None:
        if not hasattr(nanogcg, "ProbeSamplingConfig"):
            raise SystemExit(f"nanogcg {getattr(nanogcg, '__version__', '?')} has no probe sampling (ProbeSamplingConfig)")
        draft, draft_tok, _ = load(args.draft_model_dir, args.dtype, args.device)
        probe = nanogcg.ProbeSamplingConfig(draft_model=draft, draft_tokenizer=draft_tok, r=args.probe_r,
                                            sampling_factor=args.probe_sampling_factor)
    config = nanogcg.GCGConfig(num_steps=args.steps, optim_str_init=args.optim_str_init, search_width=args.search_width,
                               topk=args.topk, seed=args.seed, verbosity="WARNING",
                               **({"probe_sampling_config": probe} if probe else {}))
    logging.getLogger("nanogcg").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    result = nanogcg.run(model, tok, messages, args.target, config)
    total = time.perf_counter() - t0
    out = {
        "implementation": "nanogcg", "nanogcg": getattr(nanogcg, "__version__", "0.3.0"), "transformers": tf_version,
        "torch": torch.__version__, "threads": torch.get_num_threads(),
        "init_loss": init.get("loss"), "losses": [float(x) for x in result.losses], "strings": result.strings,
        "best_loss": float(result.best_loss), "best_string": result.best_string,
        "step_seconds": [b - a for a, b in zip(marks, marks[1:])], "total_seconds": total, **split,
    }
    args.out.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
