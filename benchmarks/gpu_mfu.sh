#!/usr/bin/env bash
# The GPU measurements of issue 19 in ONE call: the FashionCLIP B/16 bf16 train step (the
# trainer's own step, benchmarks/benchmark.py) under each speed lever, with a profile account of
# where the device time goes (benchmarks/profile_account.py); the SigLIP B/16 step; E2,
# FashionViL and FashionBERT base train-step MFU (bf16); the pad-once and pooled-last-layer
# levers (MFU on the FLOPs computed: flops.py drops the skipped work); an FP8 GEMM row
# (only where transformer-engine imports; TFLOP/s against the bf16 peak, never called MFU); the
# device side of data.resize_on='device' (the resize of one batch-512 step's crops).
#
#   OUT=/tmp/gpu_mfu benchmarks/gpu_mfu.sh [VARIANT ...]     # default: the VARIANTS list below
#   DRY_RUN=1 OUT=/tmp/gpu_dry benchmarks/gpu_mfu.sh         # CPU: every row, tiny settings
#
# Writes $OUT/log.txt (everything), $OUT/results.json (one row per variant, with its profile
# account where traced) and $OUT/traces.tgz (the .xplane.pb traces). Each variant runs in its
# own process (XLA_FLAGS are per process) under `timeout $VARIANT_TIMEOUT` (default 170 s).
# TOTAL_BUDGET (default 540 s) stops starting rows once spent; each row left out is still
# written, with "skipped": "budget ...", so one call fits a 10-minute device command.
# Rows that cannot run (no transformer-engine, the pad-once flag not wired, cuDNN tests on a
# CPU, a failure or timeout) also write a row with "skipped": why.
# DRY_RUN=1 runs every row on whatever devices there are with the smoke variants at batch 8,
# einsum attention, 1 warmup + 2 repeats and no profile: it proves each row runs end to end and
# writes its results.json row, nothing about speed.
# On a machine without our pinned stack, wheels in .whl/ (ml_collections; flax/optax as a
# fallback when the installed flax cannot import fashion_jax) are installed into /tmp/site.
set -u
OUT=${OUT:-/tmp/gpu_mfu}
mkdir -p "$OUT"
RES=$(mktemp -d)
exec > >(tee -a "$OUT/log.txt") 2>&1
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
PY=${PY:-python3}
DRY_RUN=${DRY_RUN:-0}
TOTAL_BUDGET=${TOTAL_BUDGET:-540}
START=$SECONDS

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

CLIP=(--systems=fashionclip --variant=base --set model.variant=B/16 --set model.dtype=bfloat16)
BF16=(--variant=base --set model.dtype=bfloat16)
REPS=(--warmup=3 --repeats=10)
[ "$DRY_RUN" = 1 ] && REPS=(--warmup=1 --repeats=2)

shrink() {  # DRY_RUN: smoke variants, batch 8, einsum attention, no B/16, no profile.
  local out=() after_set=0 a
  for a in "$@"; do
    if [ $after_set = 1 ]; then
      after_set=0
      case $a in model.variant=*) continue ;; esac
      out+=(--set "${a/attention_impl=cudnn/attention_impl=einsum}")
      continue
    fi
    case $a in
      --set) after_set=1 ;;
      --variant=base) out+=(--variant=smoke) ;;
      --batch=*|--profile_dir=*) ;;
      *) out+=("$a") ;;
    esac
  done
  out+=(--batch=8)
  printf '%s\n' "${out[@]}"
}

skip_row() {  # name, reason: a results.json row for a row that did not run.
  printf '{"rows": [{"skipped": "%s"}]}\n' "$2" > "$RES/$1.json"
  echo "=== SKIPPED $1: $2"
}

variant() {  # name, then benchmark flags; XLA_FLAGS from the environment.
  local name=$1; shift
  local flags=("$@")
  if [ "$DRY_RUN" = 1 ]; then mapfile -t flags < <(shrink "$@"); fi
  echo; echo "=== $(date +%T) $name: XLA_FLAGS='${XLA_FLAGS:-}' ${flags[*]}"
  timeout "${VARIANT_TIMEOUT:-170}" $PY -m benchmarks.benchmark "${REPS[@]}" "${flags[@]}" \
      --json="$RES/$name.json" 2>&1 | grep -v -E "^(WARNING|I0000|W0000)" | tail -45
  [ -f "$RES/$name.json" ] || skip_row "$name" "failed or timed out (see log.txt)"
}

fp8_gemm() {  # FP8 (e4m3) vs bf16 GEMM at the B/16 MLP shape; TFLOP/s over the bf16 peak.
  if ! $PY -c "import transformer_engine.jax" 2>/dev/null && [ "${FORCE_FP8:-0}" != 1 ]; then
    skip_row "$1" "transformer_engine.jax is not importable"
    return
  fi
  echo; echo "=== $(date +%T) $1"
  timeout "${VARIANT_TIMEOUT:-170}" $PY - "$RES/$1.json" "$DRY_RUN" <<'PYEOF'
import json, sys, time
import jax, jax.numpy as jnp
from fashion_jax.models import flops as flops_lib
dry = sys.argv[2] == "1"
m, k, n = (64, 64, 128) if dry else (512 * 197, 768, 3072)  # B/16 fc1 at batch 512.
peak = (flops_lib.peak_flops("bfloat16") or 0) / 1e12
rows = []
for name, dt in (("bf16", jnp.bfloat16), ("fp8_e4m3", jnp.float8_e4m3fn)):
  a, b = jnp.ones((m, k), dt), jnp.ones((k, n), dt)
  f = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.bfloat16))
  f(a, b).block_until_ready()
  best = float("inf")
  for _ in range(2 if dry else 20):
    t0 = time.perf_counter()
    f(a, b).block_until_ready()
    best = min(best, time.perf_counter() - t0)
  tflops = 2 * m * k * n / best / 1e12
  rows.append(dict(gemm=f"{m}x{k}x{n}", dtype=name, gemm_s=best, tflops_per_s=tflops,
                   bf16_peak_tflops=peak, of_bf16_peak=tflops / peak if peak else None,
                   note="GEMM only, not a train step; against the bf16 peak, not MFU"))
  print(rows[-1])
json.dump({"rows": rows}, open(sys.argv[1], "w"))
PYEOF
  [ -f "$RES/$1.json" ] || skip_row "$1" "failed or timed out (see log.txt)"
}

device_resize() {  # data.resize_on='device': the train step's resize of the shipped crops.
  echo; echo "=== $(date +%T) $1"
  timeout "${VARIANT_TIMEOUT:-170}" $PY - "$RES/$1.json" "$DRY_RUN" <<'PYEOF'
import json, sys, time
import jax, numpy as np
from fashion_jax.data import device_crop
dry = sys.argv[2] == "1"
b, pad, size = (8, 32, 24) if dry else (512, 256, 224)  # One B/16 batch-512 step's images.
rng = np.random.default_rng(0)
crops = jax.device_put(rng.integers(0, 256, (b, pad, pad, 3), dtype=np.uint8))
hw = rng.integers(pad // 4, pad + 1, (b, 2))
window = jax.device_put(np.concatenate([hw, rng.integers(0, 2, (b, 1))], 1).astype(np.int32))
f = jax.jit(lambda c, w: device_crop.finish_images({"image": c, "image_window": w}, size)["image"])
f(crops, window).block_until_ready()
times = []
for _ in range(3 if dry else 50):
  t0 = time.perf_counter()
  f(crops, window).block_until_ready()
  times.append(time.perf_counter() - t0)
row = dict(batch=b, crop_pad=pad, image_size=size, median_ms=float(np.median(times)) * 1e3,
           min_ms=float(min(times)) * 1e3, device=str(jax.devices()[0].device_kind),
           note="finish_images alone; compare with the same batch's step time (cudnn_b512)")
print(row)
json.dump({"rows": [row]}, open(sys.argv[1], "w"))
PYEOF
  [ -f "$RES/$1.json" ] || skip_row "$1" "failed or timed out (see log.txt)"
}

pad_once_wired() {  # H4's lever: layers.Encoder(seq_pad_multiple), read from model.seq_pad_multiple.
  grep -q "seq_pad_multiple" fashion_jax/systems/fashionclip.py
}

run_variant() {
  local P=(--profile_dir="$RES/traces/$1")
  case $1 in
    cudnn_tests)
      if [ "$DRY_RUN" = 1 ]; then skip_row "$1" "dry run: the cuDNN tests need a GPU"; return; fi
      FASHION_JAX_TEST_PLATFORMS=cuda timeout 150 $PY -m pytest -q -p no:cacheprovider \
          tests/test_layers.py tests/test_siglip.py -k cudnn 2>&1 | tail -5 | tee "$RES/tests.txt"
      printf '{"rows": [{"pytest": "%s"}]}\n' "$(tail -1 "$RES/tests.txt" | tr -d '"\\')" \
          > "$RES/$1.json" ;;
    einsum_b256) variant "$1" "${CLIP[@]}" --batch=256 "${P[@]}" ;;
    cudnn_b256) variant "$1" "${CLIP[@]}" --batch=256 --set model.attention_impl=cudnn "${P[@]}" ;;
    cudnn_b512) variant "$1" "${CLIP[@]}" --batch=512 --set model.attention_impl=cudnn "${P[@]}" ;;
    einsum_b512) variant "$1" "${CLIP[@]}" --batch=512 ;;
    cudnn_b256_cublas) XLA_FLAGS="--xla_gpu_enable_triton_gemm=false" \
                           variant "$1" "${CLIP[@]}" --batch=256 --set model.attention_impl=cudnn ;;
    cudnn_b256_remat) variant "$1" "${CLIP[@]}" --batch=256 --set model.attention_impl=cudnn \
                          --set model.remat_policy=dots_with_no_batch_dims_saveable ;;
    pad_once_b512)  # cudnn_b512 with the tokens padded once per tower (197 -> 256, 77 -> 128).
      if ! pad_once_wired; then
        skip_row "$1" "model.seq_pad_multiple is not read by systems/fashionclip.py yet (H4)"
      else
        variant "$1" "${CLIP[@]}" --batch=512 --set model.attention_impl=cudnn \
            --set model.seq_pad_multiple=64 "${P[@]}"
      fi ;;
    pooled_b512)  # cudnn_b512 with each tower's last layer computed for its pooled token only.
      variant "$1" "${CLIP[@]}" --batch=512 --set model.attention_impl=cudnn \
          --set model.pooled_last_layer=True ;;
    siglip_b16) variant "$1" --systems=fashionsiglip "${BF16[@]}" --batch=256 \
                    --set model.attention_impl=cudnn "${P[@]}" ;;
    e2_base) variant "$1" --systems=e2 "${BF16[@]}" ;;
    fashionvil_base) variant "$1" --systems=fashionvil "${BF16[@]}" ;;
    fashionbert_base) variant "$1" --systems=fashionbert "${BF16[@]}" ;;
    fp8_gemm) fp8_gemm "$1" ;;
    device_resize) device_resize "$1" ;;
    *) echo "unknown variant $1"; return 1 ;;
  esac
}

VARIANTS=("$@")
[ ${#VARIANTS[@]} -eq 0 ] && VARIANTS=(cudnn_tests cudnn_b512 einsum_b512 cudnn_b256 pad_once_b512
                                       pooled_b512 siglip_b16 e2_base fashionvil_base fashionbert_base
                                       fp8_gemm device_resize cudnn_b256_cublas einsum_b256)
for v in "${VARIANTS[@]}"; do
  if (( SECONDS - START > TOTAL_BUDGET )); then
    skip_row "$v" "budget: TOTAL_BUDGET=${TOTAL_BUDGET}s spent before this row"
  else
    run_variant "$v"
  fi
  # Collect after every variant, so a later timeout still leaves the earlier results in $OUT.
  $PY - "$RES" "$OUT/results.json" <<'PYEOF'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json")), key=os.path.getmtime):
  with open(path) as f:
    data = json.load(f)
  for row in data["rows"]:
    row["name"] = os.path.basename(path)[:-5]
    rows.append(row)
with open(sys.argv[2], "w") as f:
  json.dump(rows, f, indent=1)
PYEOF
done
[ -d "$RES/traces" ] && tar -C "$RES" -czf "$OUT/traces.tgz" traces
echo; echo "=== summary"
$PY - "$OUT/results.json" <<'PYEOF'
import json, sys
for r in json.load(open(sys.argv[1])):
  p = r.get("profile") or {}
  if "mfu" not in r:  # skipped rows, the cuDNN tests, the FP8 GEMM rows
    print(f"{r['name']:22s} " + ", ".join(f"{k}={v}" for k, v in r.items() if k != "name"))
    continue
  print(f"{r['name']:22s} {r['system']:12s} batch {r['batch_size']:4d} "
        f"{r['step_s']*1e3:8.1f} ms (blocking {r.get('blocking_step_s', 0)*1e3:6.1f}) "
        f"{r['samples_per_s']:8.0f} samples/s  MFU {r['mfu']:.1%}  busy {p.get('busy_share', 0):.0%}"
        f"  gemm {p.get('matmul_tflops_in_matmul_kernels', 0):.0f} TFLOP/s  levers {r['levers']}"
        f"  {r['xla_flags']}")
PYEOF
