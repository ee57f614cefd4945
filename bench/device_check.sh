#!/usr/bin/env bash
# The GPU check, made for the lent GPU machine: one NVIDIA H100 or H200, no network, Python 3.12
# with its own torch 2.11 (CUDA 13), Triton 3.6 and transformers 5.17, and at most 64 MiB carried
# with the working tree. It uses that machine's torch and Triton, installs the project with
# --no-deps beside the wheels bench/device_wheels.sh put in .device/ (git-ignored, ~13 MiB), and
#   - runs the engine parity tests (against transformers) with the engine on CUDA, where the
#     Triton kernels serve attention over the cache and MoE experts (--triton-kernels auto);
#   - runs the Triton kernel tests compiled for the GPU;
#   - prints native decode speed, single stream, 16 and 64 concurrent, with Token Recycling and
#     guidance, on random weights in the default model's shape and a 1.5B Llama shape
#     (bench/device_speed.py).
# vLLM cannot be checked there: its CUDA wheel (~400 MB) cannot be carried (docs/operations.md).
# Under 8 minutes on one GPU; results under $OUT (default bench/results/device/).
#   here, once (network):  bash bench/device_wheels.sh
#   there:                 bash bench/device_check.sh          (carry .device)
#   here, on the CPU:      bash bench/device_check.sh --dry-run
# --dry-run checks that what is carried covers every dependency (bench/device_carry.py), that the
# selected tests exist and import, and runs the speed script at toy size on the CPU, with this
# machine's own installs (the carried wheels are built for Python 3.12).
set -euo pipefail
cd "$(dirname "$0")/.."
DRY=0
[[ "${1:-}" == "--dry-run" ]] && DRY=1
export OUT="${OUT:-bench/results/device}" PYTHONUNBUFFERED=1
mkdir -p "$OUT"
export FREELUNCH_TEST_TOKENIZER="$PWD/.device/tokenizer"  # the default model's GGUF does not travel
python3 bench/device_carry.py check | tee "$OUT/carry.txt"
if [[ $DRY == 0 ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
    SITE=$(mktemp -d)
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .device/wheels/*.whl
    python3 -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --target "$SITE" .
    export PYTHONPATH="$SITE"
    DEVICE=cuda SHAPES=default,1.5b ROUNDS=3 COLLECT=""
else
    DEVICE=cpu SHAPES=toy ROUNDS=1 COLLECT="--collect-only"
fi
python3 -c "import torch, triton, transformers, freelunch; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__, 'freelunch', freelunch.__file__)" | tee "$OUT/versions.txt"
run_tests() {  # name, then pytest arguments; a failure is reported, and the check goes on
    local name=$1; shift
    timeout 240 python3 -m pytest -q -p no:cacheprovider $COLLECT "$@" > "$OUT/$name.txt" 2>&1 && status=ok || status="FAILED ($?)"
    echo "$name: $status: $(tail -1 "$OUT/$name.txt")" | tee -a "$OUT/summary.txt"
}
: > "$OUT/summary.txt"
# the default-model tests need its GGUF, which does not travel
FREELUNCH_TEST_DEVICE=$DEVICE run_tests parity tests/test_engine_parity.py -k "not default_model and not read_only_cache"
FREELUNCH_TEST_DEVICE=$DEVICE run_tests moe tests/test_moe.py -k "(greedy_matches_transformers or scmoe_greedy or routing_override)"
run_tests kernels tests/test_tree_attention_kernel.py tests/test_moe_kernel.py
timeout 300 python3 bench/device_speed.py --out "$OUT" --device "$DEVICE" --shapes "$SHAPES" --rounds "$ROUNDS" --tokens $([[ $DRY == 1 ]] && echo 8 || echo 128) 2>&1 | tee "$OUT/speed.txt"
! grep -q FAILED "$OUT/summary.txt"
