#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice (v4-32, v5p-64, ...): one JAX process per TPU VM host, all
# started by `gcloud compute tpus tpu-vm ssh --worker=all`. JAX finds the other hosts from the TPU
# metadata (jax.distributed.initialize() with no arguments), so no address is passed.
#
#   export TPU_NAME=my-v4-32 ZONE=us-central2-b PROJECT=my-project   (PROJECT optional)
#   launch/tpu_pod.sh setup                  # copy this checkout to every host, install it
#   launch/tpu_pod.sh train --config=configs/fashionclip.py:pod --workdir=/mnt/shared/fc_pod \
#       --config.data.data_dir=gs://my-bucket/tfds
#   launch/tpu_pod.sh logs                   # follow host 0's log (the only host that reports)
#   launch/tpu_pod.sh stop                   # SIGTERM every host: save a checkpoint and exit
#
# setup: `git archive HEAD` of this checkout (commit first) is copied to ~/fashion_jax on every
#   host, a venv ~/fashion_jax_venv is created there and `pip install jax[tpu]==0.10.2` plus
#   the package (setup.py pins the rest) are installed.
# train: runs `python -m launch.train ARGS --config.distributed=True` under nohup on every host
#   (log ~/fashion_jax_train.log, pid ~/fashion_jax_train.pid), so a dropped ssh connection does
#   not kill the job. Rerunning the same train command resumes from the newest checkpoint.
# Requirements:
#   * --workdir must be the SAME shared path on every host (Filestore/NFS, or a gcsfuse mount
#     of a bucket at the same mount point): orbax writes each host's shards of a checkpoint
#     there and process 0 finalises it; TensorBoard events and config.json come from host 0.
#   * the TFDS data_dir must be readable by every host (gs://... works); each host reads its own
#     1/num_hosts of the split (tfds.even_splits by process index).
#   * config.batch_size is the GLOBAL batch; it must divide by the number of hosts and the
#     mesh's batch axes (data x fsdp) must divide it.
# Failure handling: a host that dies stops every other host within --heartbeat_timeout_s
#   (default 100 s, exit status 134 with "Terminating process because the JAX distributed
#   service detected fatal errors"); a step that makes no progress for --step_timeout_s
#   (default 1800 s) stops with status 75. Pass either flag after `train` to change it. Then
#   rerun `train`: it resumes from the newest complete checkpoint.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME to the TPU VM name}"
: "${ZONE:?set ZONE to the TPU zone}"
GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("$TPU_NAME" "--zone=$ZONE")
if [ -n "${PROJECT:-}" ]; then WHERE+=("--project=$PROJECT"); fi
JAX_VERSION=0.10.2
REPO_DIR='~/fashion_jax'
VENV='~/fashion_jax_venv'
LOG='~/fashion_jax_train.log'
PID='~/fashion_jax_train.pid'

on_all() {  # Runs a shell command on every host of the slice.
  "${GCLOUD[@]}" ssh "${WHERE[@]}" --worker=all --command="$1"
}

cmd=${1:-}
shift || true
case "$cmd" in
  setup)
    cd "$(dirname "$0")/.."
    if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
      echo "tpu_pod.sh setup copies 'git archive HEAD': commit your changes first." >&2
      exit 1
    fi
    archive=$(mktemp --suffix=.tar.gz)
    git archive --format=tar.gz -o "$archive" HEAD
    "${GCLOUD[@]}" scp "${WHERE[@]}" --worker=all "$archive" "$TPU_NAME:fashion_jax.tar.gz"
    rm -f "$archive"
    on_all "set -e; rm -rf $REPO_DIR && mkdir -p $REPO_DIR && tar -xzf fashion_jax.tar.gz -C $REPO_DIR
      python3 -m venv $VENV && . $VENV/bin/activate && pip install -q --upgrade pip
      pip install -q 'jax[tpu]==$JAX_VERSION' && pip install -q -e $REPO_DIR
      python -c 'import jax; print(jax.process_index(), jax.local_device_count(), \"local TPU devices\")'"
    ;;
  train)
    if [ $# -eq 0 ]; then
      echo "usage: launch/tpu_pod.sh train --config=FILE[:ARG] --workdir=SHARED_DIR [...]" >&2
      exit 2
    fi
    args=$(printf '%q ' "$@")
    on_all "cd $REPO_DIR && . $VENV/bin/activate && export TF_CPP_MIN_LOG_LEVEL=2 &&
      nohup python -m launch.train $args --config.distributed=True > $LOG 2>&1 &
      echo \$! > $PID; echo \"\$(hostname): started pid \$(cat $PID), log $LOG\""
    ;;
  logs)
    "${GCLOUD[@]}" ssh "${WHERE[@]}" --worker=0 --command="tail -n 100 -f $LOG"
    ;;
  stop)
    on_all "if [ -f $PID ]; then kill -TERM \$(cat $PID) && echo \"\$(hostname): SIGTERM sent\"; fi"
    ;;
  *)
    echo "usage: launch/tpu_pod.sh setup | train ARGS... | logs | stop   (see the header)" >&2
    exit 2
    ;;
esac
