#!/usr/bin/env bash
# Prepare, on a machine with network, what bench/device_check.sh carries to the lent GPU machine
# (no network there; Python 3.12 with its own torch, Triton and transformers): into .device/
# (git-ignored, well under the 64 MiB a call may carry)
#   wheels/     the project's dependencies that machine lacks, for CPython 3.12 on manylinux x86-64,
#               at the versions installed here (bench/device_carry.py lists them)
#   tokenizer/  the default model's tokenizer (its 98 MB GGUF cannot travel): the test models' and
#               the speed models' tokenizer
#   bash bench/device_wheels.sh
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .device/wheels
rm -f .device/wheels/*.whl
python3 bench/device_carry.py requirements > .device/requirements.txt
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 \
    -d .device/wheels -r .device/requirements.txt
python3 - <<'PY'
import sys
sys.path.insert(0, "tests")
from tiny_models import default_tokenizer
default_tokenizer().save_pretrained(".device/tokenizer")
PY
python3 bench/device_carry.py check
