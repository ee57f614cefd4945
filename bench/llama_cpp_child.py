"""One bench_engines.py measurement of llama.cpp (llama-cpp-python), run by the interpreter of a
benchmark-only environment (its wheel compiles llama.cpp for several minutes: never in CI):

    python -m venv /opt/llamaenv && /opt/llamaenv/bin/pip install llama-cpp-python==0.3.36
    python bench/bench_engines.py --llama-cpp-python /opt/llamaenv/bin/python --backends native-gguf,llama.cpp

Reads {"model": path, "prompts": [[token ids]], "single": n, "max_tokens": n, "threads": n} on
stdin: the same token ids as every other backend, greedy, `max_tokens` tokens per request whatever
they are (llama.cpp's generator does not stop at an end token by itself), one request at a time
(llama-cpp-python runs one sequence: no concurrent figure). Prints `RESULT <json>`.
Imports nothing of freelunch's.
"""

from __future__ import annotations

import json
import sys
import time

import llama_cpp


def decode(llm: llama_cpp.Llama, prompt: list[int], max_tokens: int) -> tuple[float, float]:
    """(seconds for the request, seconds to its first token)."""
    llm.reset()
    start, first, count = time.perf_counter(), None, 0
    for _ in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True):
        count += 1
        if first is None:
            first = time.perf_counter() - start
        if count == max_tokens:
            break
    return time.perf_counter() - start, first or 0.0


def main() -> None:
    job = json.load(sys.stdin)
    t0 = time.perf_counter()
    options = dict(model_path=job["model"], n_ctx=2048, n_threads=job["threads"], n_threads_batch=job["threads"], verbose=False)
    try:
        llm = llama_cpp.Llama(**options, use_extra_bufts=False)  # some CPUs need it off (repacked buffers)
    except TypeError:  # a version without the option
        llm = llama_cpp.Llama(**options)
    startup = time.perf_counter() - t0
    decode(llm, job["prompts"][0], 8)  # warm-up
    runs = [decode(llm, job["prompts"][i], job["max_tokens"]) for i in range(job["single"])]
    result = {
        "startup_s": startup,
        "single_tok_s": job["single"] * job["max_tokens"] / sum(s for s, _ in runs),
        "ttft_s": sorted(f for _, f in runs)[len(runs) // 2],
        # every tensor is read once a step (the tied output layer reads the embedding table whole)
        "weight_bytes_per_step": llama_cpp.llama_model_size(llm.model),
        "system_info": llama_cpp.llama_print_system_info().decode(),
    }
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
