#!/usr/bin/env bash
# The GPU measurements behind README "Accelerator efficiency": FashionCLIP B/16 train step in
# bf16 (the trainer's own step, benchmarks/benchmark.py) under each speed lever, with a profile
# account of where the device time goes (benchmarks/profile_account.py).
#
#   OUT=/tmp/gpu_mfu benchmarks/gpu_mfu.sh [VARIANT ...]     # default: the VARIANTS list below
#
# Writes $OUT/log.txt (everything), $OUT/results.json (one benchmark row per variant, with its
# profile account) and $OUT/traces.tgz (the .xplane.pb traces). Each variant runs in its own
# process (XLA_FLAGS are per process) under `timeout $VARIANT_TIMEOUT` (default 170 s).
# On a machine without our pinned stack, wheels in .whl/ (ml_collections; flax/optax as a
# fallback when the installed flax cannot import fashion_jax) are installed into /tmp/site.
set -u
OUT=${OUT:-/tmp/gpu_mfu}
mkdir -p "$OUT"
RES=$(mktemp -d)
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
PY=${PY:-python3}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
if ! $PY -c "import ml_collections" 2>/dev/null && ls .whl/ml_collections-*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/ml_collections-*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
if ! $PY -c "import benchmarks.benchmark" 2>"$RES/import.err"; then
  echo "import failed with the installed flax/optax:"; tail -3 "$RES/import.err"
  $PY -m pip install -q --no-index --no-deps --target /tmp/site .whl/flax-*.whl .whl/optax-*.whl
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
$PY -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax',
optax.__version__, jax.devices())"

COMMON=(--systems=fashionclip --variant=base --set model.variant=B/16
        --set model.dtype=bfloat16 --warmup=3 --repeats=10)

variant() {  # name, then benchmark flags; XLA_FLAGS from the environment.
  local name=$1; shift
  echo; echo "=== $(date +%T) $name: XLA_FLAGS='${XLA_FLAGS:-}' $*"
  timeout "${VARIANT_TIMEOUT:-170}" $PY -m benchmarks.benchmark "${COMMON[@]}" "$@" \
      --json="$RES/$name.json" 2>&1 | grep -v -E "^(WARNING|I0000|W0000)" | tail -45
}

run_variant() {
  case $1 in
    cudnn_tests) FASHION_JAX_TEST_PLATFORMS=cuda timeout 150 $PY -m pytest -q \
                     -p no:cacheprovider tests/test_layers.py tests/test_siglip.py -k cudnn 2>&1 | tail -5 ;;
    einsum_b256) variant "$1" --batch=256 --profile_dir="$RES/traces/$1" ;;
    cudnn_b256) variant "$1" --batch=256 --set model.attention_impl=cudnn \
                    --profile_dir="$RES/traces/$1" ;;
    cudnn_b512) variant "$1" --batch=512 --set model.attention_impl=cudnn \
                    --profile_dir="$RES/traces/$1" ;;
    einsum_b512) variant "$1" --batch=512 ;;
    cudnn_b256_cublas) XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
                           variant "$1" --batch=256 --set model.attention_impl=cudnn ;;
    cudnn_b256_remat) variant "$1" --batch=256 --set model.attention_impl=cudnn \
                          --set model.remat_policy=dots_with_no_batch_dims_saveable ;;
    *) echo "unknown variant $1"; return 1 ;;
  esac
}

VARIANTS=("$@")
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=(cudnn_tests cudnn_b256 einsum_b256 cudnn_b512
                                       einsum_b512 cudnn_b256_cublas)
for v in "${VARIANTS[@]}"; do
  run_variant "$v"
  # Collect after every variant, so a later timeout still leaves the earlier results in $OUT.
  $PY - "$RES" "$OUT/results.json" <<'EOF'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
  with open(path) as f:
    data = json.load(f)
  for row in data["rows"]:
    row["name"] = os.path.basename(path)[:-5]
    rows.append(row)
with open(sys.argv[2], "w") as f:
  json.dump(rows, f, indent=1)
EOF
done
[ -d "$RES/traces" ] && tar -C "$RES" -czf "$OUT/traces.tgz" traces
echo; echo "=== summary"
$PY - "$OUT/results.json" <<'EOF'
import json, sys
for r in json.load(open(sys.argv[1])):
  p = r.get("profile") or {}
  print(f"{r['name']:22s} batch {r['batch_size']:4d} {r['step_s']*1e3:8.1f} ms "
        f"(blocking {r.get('blocking_step_s', 0)*1e3:6.1f}) "
        f"{r['samples_per_s']:8.0f} samples/s  MFU {r['mfu']:.1%}  busy {p.get('busy_share', 0):.0%}"
        f"  gemm {p.get('matmul_tflops_in_matmul_kernels', 0):.0f} TFLOP/s  levers {r['levers']}"
        f"  {r['xla_flags']}")
EOF
