#!/usr/bin/env bash
# GPU check of distillation, prepared for a lent H100/H200 (one `run` call, ~5 min including installs):
# ~50 bf16 steps of random:sd15 distillation at 64x64 latents, printing steps/s, samples/s, peak memory and the
# loss trend, then the cost of feature taps + normalization over output-only KD (bench_distill.py on CUDA).
#
# The device image has torch, onnx, onnxruntime and accelerate but no diffusers/transformers, and no network.
# Prepare the wheels here first (the folder is git-ignored and carried with the run):
#   .venv/bin/pip download --no-deps -d .device-wheels diffusers==0.42.1 transformers==5.24.0 tokenizers \
#       huggingface_hub safetensors regex tqdm pyyaml filelock requests packaging --only-binary=:all:
# then call the device tool with:  command="bash benchmarks/device_distill_check.sh", carry=[".device-wheels"].
set -euo pipefail
WHEELS=${WHEELS:-.device-wheels}
OUT=${OUT:-/tmp/distill-check}
STEPS=${STEPS:-50}
BATCH=${BATCH:-8}

python -c "import diffusers" 2>/dev/null || pip install -q --no-index --find-links "$WHEELS" --no-deps \
    "$WHEELS"/*.whl
pip install -q --no-deps --no-build-isolation -e . >/dev/null
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python -c "import torch, diffusers, transformers; print('torch', torch.__version__, 'diffusers', diffusers.__version__, 'transformers', transformers.__version__)"

rm -rf "$OUT" && mkdir -p "$OUT"
printf '%s\n' "a photograph of an astronaut riding a horse" "a red bicycle leaning against a brick wall" \
    "an oil painting of a lighthouse in a storm" "a close-up portrait of a tabby cat" > "$OUT/prompts.txt"
# A BK-SDM-Small student (no scoring passes needed for a handcrafted set), scored on the GPU.
python -m laptop_deploy prune --model random:sd15 --preset bk-sdm-small --additivity-sets 0 --calib 2 \
    --device cuda --out "$OUT/student"
python -m laptop_deploy distill --teacher random:sd15 --student "$OUT/student" --prompts "$OUT/prompts.txt" \
    --steps "$STEPS" --batch-size "$BATCH" --lr 1e-5 --mixed-precision bf16 --latent-size 64 64 \
    --checkpoint-every 25 --out "$OUT/run" --json > "$OUT/summary.json"
python - "$OUT" <<'EOF'
import json, sys
out = sys.argv[1]
s = json.load(open(f"{out}/summary.json"))
print(f"device {s['device']}: {s['steps_per_s']:.2f} steps/s, {s['samples_per_s']:.1f} samples/s, "
      f"peak {s.get('cuda_peak_allocated_mb', 0):,.0f} MB allocated, {s['seconds']:.1f} s for {s['steps_run']} steps")
steps = [json.loads(l) for l in open(f"{out}/run/distill_log.jsonl") if '"event"' not in l]
for r in steps[:: max(1, len(steps) // 10)] + steps[-1:]:
    print(f"step {r['step']:>4}: total {r['total']:.4f}  out {r['out']:.5f}  feat {r.get('feat', 0):.4f}  "
          f"grad_norm {r['grad_norm']:.3f}  {r['seconds'] * 1000:.0f} ms")
print("eval total:", {k: round(v["total"], 5) for k, v in s["eval"].items()})
EOF
python benchmarks/bench_distill.py --model random:sd15 --device cuda --mixed-precision bf16 --batch-size "$BATCH" \
    --latent-size 64 64 --steps 12
