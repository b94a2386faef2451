#!/usr/bin/env bash
# GPU smoke test of the trainer: ViT-B/16 + a BERT-base-size text tower (from scratch), bf16, ZeRO-2, local batch
# 256, synthetic shards at 224 px, 50 steps, on every GPU of this machine. Prints samples/s, peak memory and the
# loss's share of the step time (from the run's TensorBoard scalars), and writes them to $OUT/gpu_smoke.json.
#
#   bash tools/gpu_smoke.sh                      # on a GPU machine, from the checkout, after `make setup`
#   STEPS=3 MICRO=8 IMAGE=32 PRECISION=fp32 MODEL=vit_tiny_patch16_224 TEXT_LAYERS=1 bash tools/gpu_smoke.sh  # CPU check
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/gpu_smoke}
STEPS=${STEPS:-50}
MICRO=${MICRO:-256}
IMAGE=${IMAGE:-224}
PRECISION=${PRECISION:-bf16}
MODEL=${MODEL:-vit_base_patch16_224}
TEXT_LAYERS=${TEXT_LAYERS:-12}
NPROC=${NPROC:-$("$PY" -c "import torch; print(torch.cuda.device_count() or 2)")}
SAMPLES=$(( MICRO * NPROC * (STEPS + 2) ))
WARMUP=$(( STEPS < 5 ? STEPS : 5 ))
LOG_EVERY=$(( STEPS < 10 ? STEPS : 10 ))

mkdir -p "$OUT"
if [ ! -f "$OUT/data/info.json" ]; then
  "$PY" tools/make_synthetic_shards.py --output "$OUT/data" --num-train "$SAMPLES" --num-zeroshot 64 \
    --image-size "$IMAGE" --samples-per-shard 2048
fi
last=$(( (SAMPLES + 2047) / 2048 - 1 ))
train="$OUT/data/train/synth-train-{000000..$(printf '%06d' "$last")}.tar"

"$PY" -m deepspeed.launcher.runner --num_gpus "$NPROC" rankclip_ds/train.py --deepspeed ds_configs/zero2.json \
  --run.output_dir "$OUT" --run.name run --run.precision "$PRECISION" \
  --model.image.name "$MODEL" --model.image.image_size "$IMAGE" \
  --model.text.pretrained false \
  --model.text.overrides "{num_hidden_layers: $TEXT_LAYERS, hidden_size: 768, num_attention_heads: 12, intermediate_size: 3072}" \
  --model.text.max_length 32 --model.embed_dim 512 \
  --data.train_data "$train" --data.num_workers 4 \
  --optim.micro_batch_size "$MICRO" --schedule.total_steps "$STEPS" --schedule.warmup_steps "$WARMUP" \
  --logging.log_every "$LOG_EVERY" --logging.profile_loss true --checkpoint.every_steps 0 --checkpoint.export false \
  --eval.zeroshot_data null 2>&1 | tee "$OUT/train.log"

"$PY" - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

out = Path(sys.argv[1])
acc = EventAccumulator(str(out / "run" / "tb"))
acc.Reload()
def last(tag):
    return acc.Scalars(tag)[-1].value if tag in acc.Tags()["scalars"] else None
result = {
    "samples_per_s": last("perf/samples_per_s"),
    "samples_per_s_per_device": last("perf/samples_per_s_per_device"),
    "step_time_s": last("perf/step_time_s"),
    "loss_time_fraction": last("perf/loss_time_fraction"),
    "peak_memory_gib": last("memory/cuda_peak_gib") or last("memory/rss_peak_gib"),
    "final_loss": last("train/loss"),
}
(out / "gpu_smoke.json").write_text(json.dumps(result, indent=2))
print("| metric | value |\n|---|---|")
for k, v in result.items():
    print(f"| {k} | {v if v is None else round(v, 4)} |")
PYEOF
