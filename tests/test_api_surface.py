"""What the API says is true: unserved fields are refused by name, unserved endpoints say so,
a cut choice says why, and a method that falls back says so in a header."""

from __future__ import annotations

import json

import httpx
import pytest
from live_server import live_server, tiny_app
from openai import NotFoundError, OpenAI

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def client(server):
    base, *_ = server
    return OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


@pytest.mark.parametrize(
    "path, extra, param",
    [
        (COMPLETIONS, {"guided_json": {"type": "object"}}, "guided_json"),  # vLLM 0.32 dropped guided_*
        (CHAT, {"guided_regex": "[a-z]+"}, "guided_regex"),
        (CHAT, {"functions": [{"name": "f"}]}, "functions"),  # the pre-tools API
        (CHAT, {"bad_words": ["x"]}, "bad_words"),
        (CHAT, {"skip_special_tokens": False}, "skip_special_tokens"),
        (CHAT, {"use_beam_search": True}, "use_beam_search"),
    ],
)
def test_an_unserved_field_is_a_400_naming_it(server, path, extra, param):
    base, *_ = server
    body = {"messages": MESSAGES} if path == CHAT else {"prompt": "hi"}
    r = httpx.post(base + path, json=body | extra | {"max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error" and param in error["message"]


def test_fields_that_change_nothing_are_still_accepted(server):
    base, *_ = server
    body = {"messages": MESSAGES, "max_tokens": 2, "store": False, "metadata": {"a": "b"}, "service_tier": "auto",
            "skip_special_tokens": True, "parallel_tool_calls": None}
    assert httpx.post(base + CHAT, json=body).status_code == 200


@pytest.mark.parametrize(
    "path, extra, hint",
    [
        (CHAT, {"speculatve": {"method": "token_recycling"}}, "did you mean `speculative`?"),
        (COMPLETIONS, {"guidence": {"scale": 2}}, "did you mean `guidance`?"),
        (CHAT, {"max_token": 5}, "did you mean `max_tokens`?"),
        (CHAT, {"frobnicate": 1}, "--ignore-unknown-fields"),
        (COMPLETIONS, {"tools": [{"type": "function", "function": {"name": "f"}}]}, "served on /v1/chat/completions"),
        (COMPLETIONS, {"messages": MESSAGES}, "served on /v1/chat/completions"),
        (CHAT, {"prompt": "hi"}, "served on /v1/completions"),
    ],
)
def test_an_unknown_field_is_a_400_naming_it_with_the_field_meant(server, path, extra, hint):
    """As OpenAI's API answers ("Unrecognized request argument supplied"): a misspelt option never
    decodes plainly with a 200."""
    base, *_ = server
    body = {"messages": MESSAGES} if path == CHAT else {"prompt": "hi"}
    r = httpx.post(base + path, json=body | extra | {"max_tokens": 2})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    (name,) = extra
    assert error["param"] == name and name in error["message"] and hint in error["message"]
    assert error["type"] == "invalid_request_error" and error["code"] == "unknown_parameter"


def test_a_field_name_in_an_error_keeps_its_newline_escaped(server):
    base, *_ = server
    forged = "x\n2026-12-07 06:00:00,000 CRITICAL freelunch: FAKE admin login ok"
    r = httpx.post(base + CHAT, json={"messages": MESSAGES, "max_tokens": 2, forged: 1})
    assert r.status_code == 400 and "\n" not in r.json()["error"]["message"]


def test_ignore_unknown_fields_accepts_them_and_names_them_in_a_header(tiny_llama, caplog):
    """...and in one log line, whose client text cannot start a line of its own."""
    from freelunch.config import ServerConfig

    caplog.set_level("INFO", logger="freelunch.api")
    folder, _ = tiny_llama
    app, _ = tiny_app(folder, server_config=ServerConfig(ignore_unknown_fields=True))
    with live_server(app) as base:
        weird = "vendor\nextra"
        r = httpx.post(base + CHAT, json={"messages": MESSAGES, "max_tokens": 2, "vendor_xargs": {"a": 1}, weird: 1})
        assert r.status_code == 200, r.text
        assert r.headers["x-freelunch-ignored-fields"] == "vendor_xargs, vendor%0Aextra"
        logged = [rec.getMessage() for rec in caplog.records if "ignored unknown request fields" in rec.getMessage()]
        assert logged and all("\n" not in line for line in logged) and "vendor\\nextra" in logged[0]
        # fields it knows are still checked: an unserved value is a 400 under the flag too
        r = httpx.post(base + CHAT, json={"messages": MESSAGES, "max_tokens": 2, "use_beam_search": True})
        assert r.status_code == 400 and r.json()["error"]["param"] == "use_beam_search"
        plain = httpx.post(base + CHAT, json={"messages": MESSAGES, "max_tokens": 2})
        assert "x-freelunch-ignored-fields" not in plain.headers


def test_models_retrieve_as_openai(server, client):
    _, name, *_ = server
    model = client.models.retrieve(name)
    assert model.id == name and model.object == "model" and model.owned_by
    with pytest.raises(NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found" and e.value.body["param"] == "model"


@pytest.mark.parametrize("method, path", [("POST", "/v1/embeddings"), ("POST", "/v1/responses"), ("GET", "/v1/files")])
def test_unserved_endpoints_say_so(server, method, path):
    base, *_ = server
    r = httpx.request(method, base + path, json={"model": "m", "input": "hi"})
    assert r.status_code == 404
    error = r.json()["error"]
    assert path in error["message"] and "/v1/chat/completions" in error["message"]
    assert error["code"] == "unknown_endpoint" and error["type"] == "not_found_error"


def _events(r: httpx.Response) -> list[dict]:
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS])
def test_continuous_usage_stats(server, path):
    base, *_ = server
    body = {"messages": MESSAGES} if path == CHAT else {"prompt": "hi"}
    body |= {"max_tokens": 6, "ignore_eos": True, "temperature": 0, "stream": True,
             "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    events = _events(httpx.post(base + path, json=body))
    counts = [e["usage"]["completion_tokens"] for e in events]
    assert all(e["usage"] is not None for e in events)
    assert counts == sorted(counts) and counts[-1] == 6 and counts[0] < 6
    assert events[-1]["choices"] == [] and events[-1]["usage"]["total_tokens"] == events[-1]["usage"]["prompt_tokens"] + 6


def test_stream_options_refused_where_they_cannot_apply(server):
    base, *_ = server
    r = httpx.post(base + CHAT, json={"messages": MESSAGES, "stream_options": {"include_usage": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options"
    r = httpx.post(base + CHAT, json={"messages": MESSAGES, "stream": True, "stream_options": {"continuous_usage_stats": True}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stream_options.continuous_usage_stats"


def test_token_recycling_fallback_is_a_header(server):
    base, *_ = server
    spec = {"speculative": {"method": "token_recycling"}}
    sampled = httpx.post(base + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2, "temperature": 0.8, "seed": 1} | spec)
    assert sampled.status_code == 200
    assert sampled.headers["x-freelunch-fallback"].startswith("speculative: sampling")
    assert "fallback" in sampled.json()["usage"]["method_stats"]["speculative"]
    greedy = httpx.post(base + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2, "temperature": 0} | spec)
    assert greedy.status_code == 200 and "x-freelunch-fallback" not in greedy.headers
    with httpx.stream("POST", base + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2, "temperature": 1, "stream": True} | spec) as r:
        assert r.headers["x-freelunch-fallback"].startswith("speculative:")


def test_moe_contrast_on_a_dense_model_names_its_parameter(server):
    base, *_ = server
    r = httpx.post(base + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2, "moe_contrast": {"beta": 0.5}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "moe_contrast"
    assert "dense" in r.json()["error"]["message"]


def test_an_aborted_choice_says_abort_not_length(server):
    """A generation the engine stops (here: aborted on the worker mid-stream) ends with
    finish_reason "abort", never a plausible "length"."""
    base, _, _, worker = server
    body = {"prompt": "hi", "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
    finish = []
    with httpx.stream("POST", base + COMPLETIONS, json=body) as r:
        lines = r.iter_lines()
        for line in lines:
            if line.startswith("data: {"):
                worker.abort(json.loads(line[6:])["id"] + "-0")
                break
        for line in lines:
            if line.startswith("data: {"):
                finish += [c["finish_reason"] for c in json.loads(line[6:])["choices"] if c["finish_reason"]]
    assert finish == ["abort"]
