#!/usr/bin/env bash
# The prepared GPU check: one GPU, at most 8 minutes. Writes a log and JSON into an output folder and prints a table.
#   1. the tests marked `gpu` (tests/test_gpu.py): the loss on the device against the CPU float64 reference (fp32 and
#      bf16), 30 trainer steps in bf16 under ZeRO-2 and ZeRO-3, a kill -9 and an exact resume;
#   2. the loss at N = 65,536, D = 512 (tools/bench_loss.py): the exact chunked loss against the floor (the products
#      and the argsorts), time and peak memory, for the default and a larger chunk size; and the largest N whose loss
#      fits in 80 % of the GPU's memory;
#   3. throughput (rankclip_ds/train.py on synthetic 224 px shards): ViT-B/16 + a 12-layer, 512-wide text tower,
#      bf16, ZeRO-2, batch 256 on the one GPU: samples/s, MFU, the loss's share of the step time, peak memory.
# Each part has its own time limit and the others run whatever it gives; tools/gpu_check_report.py puts the results
# into OUT/gpu_check.json and prints them beside the targets (MFU >= 40 %, loss <= 5 % of the step, chunked <= 1.5 x
# the floor), which are measured, never asserted.
#
#   bash tools/gpu_check.sh [OUT]          # on a GPU machine, after `make setup` (OUT default: runs/gpu_check/<time>)
#   bash tools/gpu_check.sh --tiny [OUT]   # the same three parts at toy sizes on the CPU (CI runs it, ~3 minutes)
#
# Environment: PY (default: .venv/bin/python, else python3), WORK (scratch folder for shards and runs; default a
# fresh folder under TMPDIR, removed at the end unless KEEP_WORK=1), TIMEOUT_TESTS / TIMEOUT_LOSS / TIMEOUT_TRAIN
# (seconds per part).
set -uo pipefail # no -e: every part runs, and reports, even when an earlier one failed
cd "$(dirname "$0")/.." || exit 1

TINY=0
if [ "${1:-}" = "--tiny" ]; then
  TINY=1
  shift
fi
OUT=${1:-runs/gpu_check/$(date +%Y%m%d-%H%M%S)}
if [ -z "${PY:-}" ]; then
  if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=${WORK:-$(mktemp -d "${TMPDIR:-/tmp}/rankclip_gpu_check.XXXXXX")}
mkdir -p "$WORK"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" # the package, where it is not installed (a bare GPU machine)
exec > >(tee -a "$OUT/gpu_check.log") 2>&1

if [ "$TINY" = 1 ]; then
  DEVICE=cpu
  : "${TIMEOUT_TESTS:=600}" "${TIMEOUT_LOSS:=300}" "${TIMEOUT_TRAIN:=300}"
  LOSS_ARGS=(--device cpu --n 1024 --d 64 --impls chunked floor --chunk-size 32 128 --repeat 1 --threads 1
             --fit-fraction 0.8 --fit-memory-gib 0.25 --fit-rows 16)
  MODEL=vit_tiny_patch16_224 IMAGE=32 IMAGE_KW="{patch_size: 8, depth: 1}" TEXT_LAYERS=1 TEXT_WIDTH=32 TEXT_HEADS=2
  MICRO=8 STEPS=4 LOG_EVERY=2 WORKERS=1
else
  DEVICE=cuda
  : "${TIMEOUT_TESTS:=180}" "${TIMEOUT_LOSS:=150}" "${TIMEOUT_TRAIN:=150}"
  LOSS_ARGS=(--device cuda --n 65536 --d 512 --impls chunked floor --chunk-size 8 256 --repeat 2
             --fit-fraction 0.8 --fit-rows 64)
  MODEL=vit_base_patch16_224 IMAGE=224 IMAGE_KW="{}" TEXT_LAYERS=12 TEXT_WIDTH=512 TEXT_HEADS=8
  MICRO=256 STEPS=30 LOG_EVERY=10 WORKERS=8
fi
echo "RankCLIP-DS GPU check: device $DEVICE, output $OUT, scratch $WORK, python $PY"

# ---------------------------------------------------------------------------------------------------- environment
"$PY" - "$OUT/env.json" <<'PYEOF'
import json, platform, sys
import torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    props = torch.cuda.get_device_properties(0)
    info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30, capability=f"{props.major}.{props.minor}")
for name in ("deepspeed", "transformers", "timm", "webdataset"):
    try:
        info[name] = __import__(name).__version__
    except Exception as exc:  # reported, not fatal: the parts that need it will fail with their own message
        info[name] = f"missing ({type(exc).__name__})"
json.dump(info, open(sys.argv[1], "w"), indent=1)
print(json.dumps(info))
PYEOF
if [ "$DEVICE" = cuda ]; then nvidia-smi || true; fi

# ---------------------------------------------------------------------------------------------------- 1. tests
echo "== 1/3: tests marked gpu (limit ${TIMEOUT_TESTS} s)"
start=$(date +%s)
RANKCLIP_TEST_DEVICE=$DEVICE timeout -k 10 "$TIMEOUT_TESTS" "$PY" -m pytest -q -p no:cacheprovider -m gpu \
  tests/test_gpu.py --junitxml "$OUT/gpu_tests.xml" --basetemp "$WORK/pytest" -o cache_dir="$WORK/.pytest_cache"
echo "{\"exit_code\": $?, \"seconds\": $(($(date +%s) - start))}" >"$OUT/gpu_tests_run.json"

# ---------------------------------------------------------------------------------------------------- 2. loss
echo "== 2/3: the loss, chunked against the floor, and the largest N that fits (limit ${TIMEOUT_LOSS} s)"
start=$(date +%s)
timeout -k 10 "$TIMEOUT_LOSS" "$PY" tools/bench_loss.py "${LOSS_ARGS[@]}" --timeout "$TIMEOUT_LOSS" \
  --json "$OUT/loss.json"
echo "{\"exit_code\": $?, \"seconds\": $(($(date +%s) - start))}" >"$OUT/loss_run.json"

# ---------------------------------------------------------------------------------------------------- 3. training
echo "== 3/3: training throughput, $MODEL + ${TEXT_LAYERS}x${TEXT_WIDTH} text tower, batch $MICRO (limit ${TIMEOUT_TRAIN} s)"
start=$(date +%s)
samples=$((MICRO * (STEPS + 2)))
"$PY" tools/make_synthetic_shards.py --output "$WORK/data" --num-train "$samples" --num-zeroshot 16 \
  --image-size "$IMAGE" --samples-per-shard 1024 >"$WORK/make_shards.log" 2>&1
last=$(((samples + 1023) / 1024 - 1))
timeout -k 20 "$TIMEOUT_TRAIN" "$PY" -m torch.distributed.run --nproc_per_node 1 --master_port "${MASTER_PORT:-29611}" \
  rankclip_ds/train.py --deepspeed ds_configs/zero2.json \
  --run.output_dir "$WORK/runs" --run.name throughput --run.precision bf16 \
  --model.image.name "$MODEL" --model.image.image_size "$IMAGE" --model.image.model_kwargs "$IMAGE_KW" \
  --model.text.pretrained false --model.text.max_length 32 \
  --model.text.overrides "{num_hidden_layers: $TEXT_LAYERS, hidden_size: $TEXT_WIDTH, num_attention_heads: $TEXT_HEADS, intermediate_size: $((TEXT_WIDTH * 4))}" \
  --model.embed_dim 512 \
  --data.train_data "$WORK/data/train/synth-train-{000000..$(printf '%06d' "$last")}.tar" --data.num_workers "$WORKERS" \
  --optim.micro_batch_size "$MICRO" --schedule.total_steps "$STEPS" --schedule.warmup_steps 2 \
  --logging.log_every "$LOG_EVERY" --logging.profile_loss true --checkpoint.every_steps 0 --checkpoint.export false \
  --eval.zeroshot_data null
echo "{\"exit_code\": $?, \"seconds\": $(($(date +%s) - start))}" >"$OUT/train_run.json"

# ---------------------------------------------------------------------------------------------------- report
"$PY" tools/gpu_check_report.py "$OUT" --tensorboard "$WORK/runs/throughput/tb" --tiny "$TINY"
rc=$?
if [ "${KEEP_WORK:-0}" != 1 ]; then rm -rf "$WORK"; fi
exit $rc
