"""The OpenAI API end to end: a real uvicorn server on loopback, driven by the official SDK."""

from __future__ import annotations

import time

import httpx
import pytest
from live_server import live_server, tiny_app
from openai import BadRequestError, NotFoundError, OpenAI





@pytest.fixture(scope="module")
def client(server):
    base, *_ = server
    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


def _hf_greedy(hf_model, ids: list[int], n: int) -> list[int]:
    import torch

    out = hf_model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    return out[0, len(ids) :].tolist()


def test_models_health_ready(server, client):
    base, name, *_ = server
    assert [m.id for m in client.models.list().data] == [name]
    assert httpx.get(base + "/health").json() == {"status": "ok"}
    assert httpx.get(base + "/ready").status_code == 200


def test_completion_greedy_matches_transformers(server, client):
    _, name, hf_model, worker = server
    tok = worker.engine.tokenizer
    prompt = "The quick brown fox"
    r = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True})
    expected = tok.decode(_hf_greedy(hf_model, tok.encode(prompt), 12), skip_special_tokens=True)
    assert r.choices[0].text == expected
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 12 and r.usage.prompt_tokens == len(tok.encode(prompt))
    assert r.object == "text_completion" and r.id.startswith("cmpl-")


def test_chat_stream_equals_non_stream(client, server):
    _, name, *_ = server
    msgs = [{"role": "user", "content": "Say something."}]
    full = client.chat.completions.create(model=name, messages=msgs, max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    stream = client.chat.completions.create(
        model=name, messages=msgs, max_tokens=10, temperature=0, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
    )
    text, usage, finish, roles = "", None, None, 0
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            roles += c.delta.role == "assistant"
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == full.choices[0].message.content
    assert finish == "length" and roles == 1
    assert usage.completion_tokens == 10 == full.usage.completion_tokens


def test_seeded_sampling_reproducible_and_n(client, server):
    _, name, *_ = server
    kw = dict(model=name, prompt="Once upon a time", max_tokens=8, temperature=1.0, top_p=0.9, seed=7, n=3, extra_body={"ignore_eos": True})
    a = client.completions.create(**kw)
    b = client.completions.create(**kw)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]
    assert sorted(c.index for c in a.choices) == [0, 1, 2]
    assert len({c.text for c in a.choices}) > 1  # each choice its own stream
    assert a.usage.completion_tokens == 24


def test_stop_string_and_stop_token(client, server):
    _, name, hf_model, worker = server
    tok = worker.engine.tokenizer
    ids = tok.encode("Hello there")
    greedy = _hf_greedy(hf_model, ids, 10)
    text = tok.decode(greedy, skip_special_tokens=True)
    stop = text[3:6]
    r = client.completions.create(model=name, prompt="Hello there", max_tokens=10, temperature=0, stop=[stop], extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].text == text[: text.index(stop)]
    r = client.completions.create(
        model=name, prompt="Hello there", max_tokens=10, temperature=0, extra_body={"stop_token_ids": [greedy[2]], "ignore_eos": True}
    )
    assert r.choices[0].finish_reason == "stop" and r.usage.completion_tokens == greedy.index(greedy[2]) + 1


def test_logprobs_and_echo(client, server):
    _, name, hf_model, worker = server
    import torch

    tok = worker.engine.tokenizer
    prompt = "a b c d"
    ids = tok.encode(prompt)
    r = client.completions.create(model=name, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2, extra_body={"ignore_eos": True})
    lp = r.choices[0].logprobs
    assert r.choices[0].text.startswith(prompt)
    assert len(lp.tokens) == len(ids) + 3 and lp.token_logprobs[0] is None
    with torch.no_grad():
        logits = hf_model(torch.tensor([ids])).logits[0].log_softmax(-1)
    expected = [float(logits[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert lp.token_logprobs[1 : len(ids)] == pytest.approx(expected, abs=1e-4)
    assert all(len(t) == 2 for t in lp.top_logprobs[1:])
    chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}], max_tokens=3, temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(c.top_logprobs) == 3 for c in content)
    assert all(c.logprob <= 0 and c.top_logprobs[0].logprob >= c.logprob - 1e-6 for c in content)


def test_penalties_and_extensions_accepted(client, server):
    _, name, *_ = server
    r = client.completions.create(
        model=name, prompt="x y x y", max_tokens=6, temperature=0, presence_penalty=1.0, frequency_penalty=0.5,
        extra_body={"repetition_penalty": 1.3, "min_tokens": 6, "top_k": 5}, user="tester",
    )
    assert r.usage.completion_tokens == 6


@pytest.mark.parametrize(
    "body,param",
    [
        ({"prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"prompt": "x", "temperature": "hot"}, "temperature"),
        ({"prompt": "x", "n": 1000}, "n"),
        ({"prompt": "x", "stop": ["s"] * 100}, "stop"),
        ({"prompt": "x", "logprobs": 50}, "logprobs"),
        ({"prompt": "x", "max_tokens": 100000}, "max_tokens"),
        ({"prompt": "x " * 600}, "prompt"),
        ({"prompt": [99999999]}, "prompt"),
        ({}, "prompt"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, param):
    base, name, *_ = server
    r = httpx.post(base + "/v1/completions", json={"model": name, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["message"]
    assert err["param"] is None or param in err["param"]
    assert httpx.get(base + "/health").status_code == 200


def test_invalid_json_and_unknown_model(server, client):
    base, *_ = server
    r = httpx.post(base + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with pytest.raises(NotFoundError):
        client.chat.completions.create(model="../../etc/passwd", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(BadRequestError):
        client.chat.completions.create(model=server[1], messages=[])


def test_metrics_exported(server, client):
    base, name, *_ = server
    client.completions.create(model=name, prompt="metrics", max_tokens=2, temperature=0)
    text = httpx.get(base + "/metrics").text
    for metric in (
        "freelunch_requests_running", "freelunch_requests_waiting", "freelunch_request_success_total",
        "freelunch_prompt_tokens_total", "freelunch_generation_tokens_total",
        "freelunch_time_to_first_token_seconds_bucket", "freelunch_time_per_output_token_seconds_bucket",
        "freelunch_e2e_request_latency_seconds_bucket", "freelunch_kv_cache_usage_ratio",
    ):
        assert metric in text, metric
    # the CPU the server runs on, as /proc/cpuinfo names it
    from freelunch.cpu_features import cpu_features, isa_level

    info = next(line for line in text.splitlines() if line.startswith("freelunch_cpu_info{"))
    assert f'isa="{isa_level()}"' in info and f'features="{" ".join(cpu_features())}"' in info
    # and what runs the workers' linears: the tiny float32 model's, our float kernels
    from freelunch.kernels import cpu_kernels

    assert f'kernels="{"float-avx2" if cpu_kernels.load() else "torch"}"' in info
    # forwards by the path the layers took: the tiny Llama's decode steps run in one C call
    steps = {line.split('"')[1]: float(line.split()[-1]) for line in text.splitlines() if line.startswith("freelunch_engine_steps_total{")}
    assert set(steps) == {"one_call", "per_layer"} and steps["one_call"] >= 1


def test_stream_disconnect_frees_kv(server):
    base, name, _, worker = server
    with httpx.stream("POST", base + "/v1/completions", json={"model": name, "prompt": "go", "max_tokens": 400, "stream": True, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                break
    deadline = time.time() + 10
    while time.time() < deadline and worker.engine.requests:
        time.sleep(0.05)
    assert not worker.engine.requests
    assert worker.engine.blocks.usage == 0.0


def test_speculative_option_over_http(server, client):
    base, name, *_ = server
    kw = dict(model=name, prompt="1, 2, 3, 4, 5, 6,", max_tokens=24, temperature=0)
    plain = client.completions.create(**kw, extra_body={"ignore_eos": True})
    spec = client.completions.create(**kw, extra_body={"ignore_eos": True, "speculative": {"method": "token_recycling"}})
    assert spec.choices[0].text == plain.choices[0].text
    stats = spec.usage.model_extra["method_stats"]["speculative"]
    assert stats["steps"] >= 1 and stats["mean_accepted_tokens_per_step"] >= 1.0
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(**kw, stream=True, extra_body={"ignore_eos": True, "speculative": {}})
        if c.choices
    )
    assert streamed == plain.choices[0].text
    assert "freelunch_spec_decode_num_draft_tokens_total" in httpx.get(base + "/metrics").text
    r = httpx.post(base + "/v1/completions", json={"model": name, "prompt": "x", "speculative": {"method": "medusa"}})
    assert r.status_code == 400 and "speculative" in r.json()["error"]["message"]


def test_echo_with_zero_max_tokens_scores_the_prompt(server):
    """What evaluation harnesses send for log-likelihoods: echo, logprobs, max_tokens 0."""
    base, name, *_ = server
    r = httpx.post(base + "/v1/completions", json={"model": name, "prompt": "one two three", "max_tokens": 0, "echo": True, "logprobs": 0})
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["text"] == "one two three" and choice["finish_reason"] == "length"
    lp = choice["logprobs"]["token_logprobs"]
    assert lp[0] is None and all(x <= 0 for x in lp[1:]) and len(lp) == r.json()["usage"]["prompt_tokens"]
    assert r.json()["usage"]["completion_tokens"] == 0


def test_server_default_method_composes_with_the_request_own(tiny_llama):
    """`serve --speculative token_recycling`: plain requests get it; a request that asks for another
    method gets both (composed); `{"method": "none"}` opts out."""
    folder, _ = tiny_llama
    app, _ = tiny_app(folder, default_methods={"speculative": {"method": "token_recycling"}})
    body = {"model": folder.name, "prompt": "Hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    with live_server(app) as base:
        default = httpx.post(base + "/v1/completions", json=body).json()
        guided = httpx.post(base + "/v1/completions", json=body | {"guidance": {"scale": 2.0}})
        off = httpx.post(base + "/v1/completions", json=body | {"speculative": {"method": "none"}}).json()
    assert set(default["usage"]["method_stats"]) == {"speculative"}
    assert guided.status_code == 200, guided.text
    assert set(guided.json()["usage"]["method_stats"]) == {"guidance", "speculative"}
    assert not off["usage"].get("method_stats")
    assert off["choices"][0]["text"] == default["choices"][0]["text"]  # lossless
