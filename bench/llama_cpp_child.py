"""One bench_engines.py measurement of llama.cpp (llama-cpp-python), run by the interpreter of a
benchmark-only environment (its wheel compiles llama.cpp for several minutes: never in CI):

    python -m venv /opt/llamaenv && /opt/llamaenv/bin/pip install llama-cpp-python==0.3.36
    python bench/bench_engines.py --llama-cpp-python /opt/llamaenv/bin/python --backends native-gguf,llama.cpp

Reads {"model": path, "prompts": [[token ids]], "single": n, "max_tokens": n, "threads": n} on
stdin: the same token ids as every other backend, greedy, `max_tokens` tokens per request whatever
they are (llama.cpp's generator does not stop at an end token by itself), the first `single`
prompts one request at a time. With "long_prompts": [[token ids]], each is also prefilled alone for
one token (`long_ttft_s`: the median time to its first token). With "concurrency": n in the job, the first n prompts are then
decoded together (`concurrent_tok_s`): llama-cpp-python's high-level API runs one sequence, so this
part uses its low-level API as llama-server's parallel slots do: one context with a sequence per
request (non-unified KV cache, n_ctx shared equally), the prompts prefilled in one batch, then one
llama_decode a step for all sequences, greedy argmax of each sequence's logits; the high-level
model is closed first, so peak memory holds one context at a time. Prints `RESULT <json>`.
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


def concurrent(job: dict) -> float:
    """Tokens a second of the first job["concurrency"] prompts decoded together (see the docstring)."""
    import numpy as np

    prompts, steps, n = job["prompts"][: job["concurrency"]], job["max_tokens"], job["concurrency"]
    mparams = llama_cpp.llama_model_default_params()
    if hasattr(mparams, "use_extra_bufts"):
        mparams.use_extra_bufts = False  # as in main()
    model = llama_cpp.llama_model_load_from_file(job["model"].encode(), mparams)
    vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    per_seq = -(-(max(len(p) for p in prompts) + steps + 1) // 256) * 256
    cparams = llama_cpp.llama_context_default_params()
    cparams.n_ctx, cparams.n_seq_max = n * per_seq, n
    cparams.n_batch = max(512, sum(len(p) for p in prompts))
    cparams.n_threads = cparams.n_threads_batch = job["threads"]
    cparams.kv_unified = False
    ctx = llama_cpp.llama_init_from_model(model, cparams)
    batch = llama_cpp.llama_batch_init(cparams.n_batch, 0, 1)

    def decode(items: list[tuple[int, int, int, bool]]) -> list[int]:
        """(token, position, sequence, wants logits) -> the argmax of each requested row."""
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        rows = [i for i, item in enumerate(items) if item[3]]
        return [int(np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, i), shape=(vocab,)).argmax()) for i in rows]

    def run(max_tokens: int) -> float:
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        start = time.perf_counter()
        items = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        tokens = decode(items)  # every sequence's first token
        for step in range(1, max_tokens):
            tokens = decode([(t, len(p) + step - 1, s, True) for s, (t, p) in enumerate(zip(tokens, prompts))])
        return n * max_tokens / (time.perf_counter() - start)

    run(2)  # warm-up
    result = run(steps)
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    llama_cpp.llama_model_free(model)
    return result


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
    if job.get("long_prompts"):  # time to first token on long prompts (the prompt's prefill)
        result["long_ttft_s"] = sorted(decode(llm, p, 1)[1] for p in job["long_prompts"])[len(job["long_prompts"]) // 2]
    if job.get("concurrency"):
        llm.close()
        result["concurrent_tok_s"] = concurrent(job)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
