#!/usr/bin/env bash
# The short pipeline on GPUs: refusal directions, the RFA attack, ReFAT training for a few steps on one
# GPU and on all of them (accelerate launch, configs/accelerate/ddp.yaml), one gradient attack (GCG) and
# one model judge (over all GPUs with --device-map auto). Prints each step's time and peak GPU memory
# and fails on the first error. The mechanics checks (tests marked `gpu`) run first.
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

step directions python -m refat.cli directions "${DATA[@]}" --kl-threshold 1e9 --induce-refusal-threshold=-1e9 \
    --screen-prompts none --out "$OUT/directions"
step rfa python -m refat.cli attack rfa --model "$MODEL" --directions "$OUT/directions" --behaviours "$OUT/harmful.csv" \
    --n-behaviours 8 --harmless "$OUT/harmless.jsonl" --n-harmless 8 --max-new-tokens 16 --out "$OUT/rfa"
step train-1gpu python -m refat.cli "${TRAIN[@]}" --report-to tensorboard --out "$OUT/train-1gpu"
step "train-${NGPU}gpu" accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes "$NGPU" \
    -m refat.cli "${TRAIN[@]}" --out "$OUT/train-${NGPU}gpu"
step gcg python -m refat.cli attack gcg --model "$MODEL" --behaviours "$OUT/harmful.csv" --n-behaviours 2 \
    --num-steps 4 --search-width 64 --max-new-tokens 16 --out "$OUT/gcg"
step judge python -m refat.cli judge-agreement "llm:$MODEL" --device-map auto --out "$OUT/judge.json"

python - "$OUT" "$NGPU" <<'PY'
import json, sys
from pathlib import Path
out, n = Path(sys.argv[1]), sys.argv[2]
one, many = (json.loads((out / f"train-{k}gpu" / "train_summary.json").read_text()) for k in ("1", n))
print(f"gpu-check: final loss 1 GPU {one['final_loss']:.4f} (world {one['world_size']}), {n} GPU(s) "
      f"{many['final_loss']:.4f} (world {many['world_size']}); dtype {one['model_source']['dtype']}")
assert many["world_size"] == int(n), "accelerate launch did not start one process per GPU"
assert abs(one["final_loss"] - many["final_loss"]) < 0.05, "data parallel diverges from one GPU beyond bf16 noise"
PY
echo "gpu-check: all steps passed"
