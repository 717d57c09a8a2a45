#!/usr/bin/env bash
# The main job of README's quickstart, in the current Python environment:
# build the synthetic catalog, train the smoke FashionCLIP, evaluate it, export it to PyTorch.
#   bash launch/quickstart.sh [WORKDIR]        (default runs/fashionclip_smoke)
# DATA_DIR (default: tfds's, $TFDS_DATA_DIR or ~/tensorflow_datasets) is where the catalog goes.
set -euo pipefail
cd "$(dirname "$0")/.."
WORKDIR=${1:-runs/fashionclip_smoke}
CONFIG=configs/fashionclip.py:smoke
DATA_ARGS=()
if [ -n "${DATA_DIR:-}" ]; then DATA_ARGS=(--data_dir="$DATA_DIR"); fi
CONFIG_DATA=()
if [ -n "${DATA_DIR:-}" ]; then CONFIG_DATA=(--config.data.data_dir="$DATA_DIR"); fi
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}

echo "== 1/4 build synthetic_catalog/smoke"
python -m launch.build_data --dataset=synthetic_catalog/smoke "${DATA_ARGS[@]}"
echo "== 2/4 train $CONFIG -> $WORKDIR"
python -m launch.train --config="$CONFIG" --workdir="$WORKDIR" "${CONFIG_DATA[@]}" \
  --alsologtostderr=false
echo "== 3/4 evaluate (test, holdout_brand, holdout_category, improbable)"
python -m launch.evaluate --config="$CONFIG" --workdir="$WORKDIR" "${CONFIG_DATA[@]}"
echo "== 4/4 export to a transformers CLIPModel directory"
python -m launch.export --workdir="$WORKDIR" --out="$WORKDIR/export" --overwrite
python - "$WORKDIR/export" <<'PY'
import sys
import transformers
model = transformers.CLIPModel.from_pretrained(sys.argv[1])
processor = transformers.CLIPProcessor.from_pretrained(sys.argv[1])
n = sum(p.numel() for p in model.parameters())
print(f"loaded {sys.argv[1]} with transformers.CLIPModel: {n:,} parameters; CLIPProcessor ok")
PY
