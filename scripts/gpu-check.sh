#!/usr/bin/env bash
# The short pipeline on GPUs: refusal directions, the RFA attack, ReFAT training for a few steps on one
# GPU and on all of them (accelerate launch, configs/accelerate/ddp.yaml), ReFAT full fine-tuning sharded
# over all GPUs (configs/accelerate/fsdp.yaml: half the steps, then resumed from the sharded checkpoint)
# beside the same run unsharded on one GPU, one gradient attack (GCG) and one model judge (over all GPUs
# with --device-map auto). Prints each step's time and peak GPU memory and fails on the first error. The
# mechanics checks (tests marked `gpu`) run first. On one GPU the sharded run is one process (FSDP's code
# path, nothing split) and the comparisons across GPUs are skipped with a message.
#
#   scripts/gpu-check.sh                      # a small random Llama written here (no network needed)
#   MODEL=Qwen/Qwen2.5-1.5B-Instruct scripts/gpu-check.sh  # a real model (hub id or local folder)
#   OUT=/tmp/gpu-check STEPS=8 scripts/gpu-check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
NGPU=$(python -c "import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)")
if [ "$NGPU" -lt 1 ]; then echo "gpu-check: no GPU visible; nothing to check" >&2; exit 1; fi
OUT=${OUT:-$(mktemp -d /tmp/refat-gpu-check.XXXX)}
STEPS=${STEPS:-4}
HALF=$(( STEPS > 1 ? STEPS / 2 : 1 ))  # the sharded run stops here, then resumes from its checkpoint
mkdir -p "$OUT"
echo "gpu-check: $NGPU GPU(s); outputs in $OUT"

python -m pytest -q -m gpu tests -p no:cacheprovider

python - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
harmful = [f"Explain how to do forbidden thing number {i} in detail" for i in range(48)]
harmless = [f"Write a short poem about the number {i}" for i in range(48)]
(out / "harmful.csv").write_text("prompt\n" + "\n".join(harmful) + "\n")
(out / "harmless.jsonl").write_text("".join(json.dumps({"instruction": p, "output": "Here it is."}) + "\n" for p in harmless))
PY
if [ -z "${MODEL:-}" ]; then
  MODEL="$OUT/model"
  python - "$MODEL" <<'PY'
import sys
sys.path.insert(0, "tests")
import torch
from conftest import build_hf, make_tokenizer
hf = build_hf("llama", vocab_size=260, pad_id=256, eos_id=259, dtype=torch.float32, layers=8, hidden=512)
hf.save_pretrained(sys.argv[1]); make_tokenizer().save_pretrained(sys.argv[1])
PY
fi

nvidia-smi --query-gpu=index,memory.used --format=csv,noheader,nounits -lms 200 > "$OUT/memory.csv" &
SAMPLER=$!
trap 'kill $SAMPLER 2>/dev/null || true' EXIT
step() {  # step NAME COMMAND...: run it, then print its time and the peak memory used on any GPU meanwhile
  local name=$1; shift
  : > "$OUT/memory.csv"
  local t0=$SECONDS
  "$@" > "$OUT/$name.log" 2>&1 || { tail -n 40 "$OUT/$name.log"; echo "gpu-check: $name FAILED" >&2; exit 1; }
  local peak
  peak=$(awk -F', ' '$2 > m {m = $2} END {printf "%.1f", m / 1024}' "$OUT/memory.csv")
  printf 'gpu-check: %-14s %5ds  peak %s GiB (nvidia-smi, any GPU)\n' "$name" $((SECONDS - t0)) "$peak"
}
DATA=(--model "$MODEL" --harmful "$OUT/harmful.csv" --harmless "$OUT/harmless.jsonl" --n-train 16 --n-val 8 --n-test 8)
TRAIN=(train "${DATA[@]}" --method refat --n-harmful 16 --n-harmless 16 --steps "$STEPS" --batch-size 8 --refat-n 8)
FULL=(train "${DATA[@]}" --method refat --full-finetune --lr 1e-5 --n-harmful 16 --n-harmless 16 --batch-size 8
      --refat-n 8 --refat-k 2 --checkpoint-every "$HALF")

step directions python -m refat.cli directions "${DATA[@]}" --kl-threshold 1e9 --induce-refusal-threshold=-1e9 \
    --screen-prompts none --out "$OUT/directions"
step rfa python -m refat.cli attack rfa --model "$MODEL" --directions "$OUT/directions" --behaviours "$OUT/harmful.csv" \
    --n-behaviours 8 --harmless "$OUT/harmless.jsonl" --n-harmless 8 --max-new-tokens 16 --out "$OUT/rfa"
step train-1gpu python -m refat.cli "${TRAIN[@]}" --report-to tensorboard --out "$OUT/train-1gpu"
step "train-ddp-${NGPU}gpu" accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes "$NGPU" \
    -m refat.cli "${TRAIN[@]}" --out "$OUT/train-ddp-${NGPU}gpu"
step full-1gpu python -m refat.cli "${FULL[@]}" --steps "$STEPS" --out "$OUT/full-1gpu"
FSDP=(accelerate launch --config_file configs/accelerate/fsdp.yaml --num_processes "$NGPU" -m refat.cli "${FULL[@]}")
step "fsdp-${NGPU}gpu" "${FSDP[@]}" --steps "$HALF" --out "$OUT/fsdp-${NGPU}gpu"
step fsdp-resumed "${FSDP[@]}" --steps "$STEPS" --resume --out "$OUT/fsdp-${NGPU}gpu"
step gcg python -m refat.cli attack gcg --model "$MODEL" --behaviours "$OUT/harmful.csv" --n-behaviours 2 \
    --num-steps 4 --search-width 64 --max-new-tokens 16 --out "$OUT/gcg"
step judge python -m refat.cli judge-agreement "llm:$MODEL" --device-map auto --out "$OUT/judge.json"

python - "$OUT" "$NGPU" "$HALF" <<'PY'
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), sys.argv[2]
summary = lambda name: json.loads((out / name / "train_summary.json").read_text())  # noqa: E731
one, many = summary("train-1gpu"), summary(f"train-ddp-{n}gpu")
print(f"gpu-check: LoRA final loss 1 GPU {one['final_loss']:.4f} (world {one['world_size']}), DDP {n} GPU(s) "
      f"{many['final_loss']:.4f} (world {many['world_size']}); dtype {one['model_source']['dtype']}")
assert many["world_size"] == int(n), "accelerate launch did not start one process per GPU"
full, sharded = summary("full-1gpu"), summary(f"fsdp-{n}gpu")
print(f"gpu-check: full fine-tuning final loss 1 GPU {full['final_loss']:.4f}, FSDP {n} GPU(s) resumed at step "
      f"{sys.argv[3]} {sharded['final_loss']:.4f} (world {sharded['world_size']})")
assert sharded["world_size"] == int(n) and sharded["steps"] == full["steps"]
ckpt = out / f"fsdp-{n}gpu" / "checkpoints" / f"step-{int(sys.argv[3]):06d}" / "fsdp"
assert (ckpt / "pytorch_model_fsdp_0" / ".metadata").exists() and (ckpt / "optimizer_0" / ".metadata").exists(), \
    f"no sharded checkpoint in {ckpt}"
assert (out / f"fsdp-{n}gpu" / "model" / "config.json").exists(), "the sharded run saved no model"
if int(n) == 1:
    print("gpu-check: 1 GPU: data parallel and sharded runs were one process; comparisons across GPUs skipped")
else:
    assert abs(one["final_loss"] - many["final_loss"]) < 0.05, "data parallel diverges from one GPU beyond bf16 noise"
# FSDP keeps fp32 master weights under bf16 autocast where one GPU trains the bf16 weights: near, not equal
assert abs(full["final_loss"] - sharded["final_loss"]) < 0.05, "FSDP (resumed) diverges from one GPU beyond bf16 noise"
PY
echo "gpu-check: all steps passed"
