"""JSON under a constraint finishes: the whitespace between tokens and free strings and numbers are
bounded by default (constraints/json_layout.py), stated in the docs and overridable per request
through `structured_outputs`, for `response_format`, `structured_outputs.json` and tool arguments.

The decisive checks push the tiny model with `logit_bias` toward what a small model does when it
runs away (more digits, more newlines, one more character): the bound is what ends the output."""

from __future__ import annotations

import json

import httpx
import jsonschema
import pytest
from freelunch.constraints.json_layout import (
    ANY_WHITESPACE_MAX,
    DEFAULT_MAX_NUMBER_DIGITS,
    any_object_schema,
    bounded_schema,
)
from live_server import live_server, tiny_app

CHAT = "/v1/chat/completions"
NUMBER = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
TEXT = {"type": "object", "properties": {"s": {"type": "string"}}, "required": ["s"], "additionalProperties": False}


@pytest.fixture(scope="module")
def api(tiny_llama):
    folder, _ = tiny_llama
    app, worker = tiny_app(folder, max_model_len=1024)
    with live_server(app) as base:
        yield base, worker.served.tokenizer


def _token(tokenizer, text: str) -> str:
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, (text, ids)
    return str(ids[0])


def _chat(base: str, body: dict) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": "Data please"}], "temperature": 0, "max_tokens": 200} | body
    return httpx.post(base + CHAT, json=body, timeout=120)


# ---- the schema rewrite --------------------------------------------------------------------


def test_free_strings_numbers_and_keys_get_bounds_and_bounded_ones_keep_theirs():
    schema = {
        "type": "object",
        "properties": {
            "free": {"type": "string"},
            "short": {"type": "string", "maxLength": 3},
            "code": {"type": "string", "pattern": "^[A-Z]{2}$"},
            "when": {"type": "string", "format": "date"},
            "colour": {"type": "string", "enum": ["red", "blue"]},
            "count": {"type": "integer"},
            "age": {"type": "integer", "minimum": 0},
            "ratio": {"type": ["number", "null"], "default": {"type": "string"}},
            "tags": {"type": "array", "items": {"$ref": "#/$defs/tag"}},
            "extra": {"type": "object", "additionalProperties": {"type": "string"}},
        },
        "$defs": {"tag": {"anyOf": [{"type": "string"}, {"type": "integer", "maximum": 5}]}},
    }
    before = json.dumps(schema)
    out = bounded_schema(schema, 100, 4)
    assert json.dumps(schema) == before, "the request's schema is not modified in place"
    p = out["properties"]
    assert p["free"]["maxLength"] == 100 and p["short"]["maxLength"] == 3
    assert "maxLength" not in p["code"] and "maxLength" not in p["when"] and "maxLength" not in p["colour"]
    assert (p["count"]["minimum"], p["count"]["maximum"]) == (-9999, 9999)
    assert (p["age"]["minimum"], p["age"]["maximum"]) == (0, 9999)
    assert p["ratio"]["maximum"] == 9999 and p["ratio"]["default"] == {"type": "string"}, "data values are not schemas"
    string, integer = out["$defs"]["tag"]["anyOf"]
    assert string["maxLength"] == 100 and (integer["minimum"], integer["maximum"]) == (-9999, 5)
    assert p["extra"]["propertyNames"] == {"maxLength": 100} and p["extra"]["additionalProperties"]["maxLength"] == 100
    assert bounded_schema(schema, None, None) == schema


def test_strings_are_bounded_on_the_output_not_in_the_grammar():
    """A length bound in an xgrammar grammar costs over a second of compile per schema: the API
    hands the bound to the engine beside the schema instead; a schema's own longer maxLength
    raises it."""
    from freelunch.api.protocol import ChatCompletionRequest
    from freelunch.api.structured import JSONLayout

    spec = JSONLayout().schema({"type": "object", "properties": {"s": {"type": "string"}}}, "response_format")
    assert "maxLength" not in spec.value and spec.max_string == 1024
    longer = JSONLayout().schema({"type": "object", "properties": {"s": {"type": "string", "maxLength": 5000}}}, "x")
    assert longer.max_string == 5000
    free = JSONLayout.of(ChatCompletionRequest.model_validate(
        {"messages": [{"role": "user", "content": "x"}], "structured_outputs": {"max_string_length": None}}
    ).structured_outputs)
    assert free.schema({"type": "string"}, "x").max_string == 0


def test_any_object_is_a_bounded_object():
    out = bounded_schema(any_object_schema(), 8, 2)
    jsonschema.validate({"ab": [1, "x", {"c": None}], "d": -1.5}, out)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"ab": "123456789"}, out)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"ab": 100}, out)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate([1], out)


# ---- what a client sees ----------------------------------------------------------------------


def test_a_runaway_number_ends_at_the_default_digits_and_runs_on_without_the_bound(api):
    base, tok = api
    push = {"logit_bias": {_token(tok, "1"): 100}}
    rf = {"response_format": {"type": "json_schema", "json_schema": {"name": "n", "schema": NUMBER}}}
    r = _chat(base, rf | push)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop"
    assert json.loads(choice["message"]["content"]) == {"n": int("1" * DEFAULT_MAX_NUMBER_DIGITS)}
    # the same request with the bound lifted: digits until max_tokens
    r = _chat(base, rf | push | {"structured_outputs": {"max_number_digits": None}, "max_tokens": 40})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] == "length"
    # and set lower, on structured_outputs' own schema
    r = _chat(base, push | {"structured_outputs": {"json": NUMBER, "max_number_digits": 3}})
    assert json.loads(r.json()["choices"][0]["message"]["content"]) == {"n": 111}


def test_a_runaway_string_ends_at_its_bound(api):
    base, tok = api
    push = {"logit_bias": {_token(tok, "a"): 100}}
    r = _chat(base, push | {"structured_outputs": {"json": TEXT, "max_string_length": 7}})
    choice = r.json()["choices"][0]
    value = json.loads(choice["message"]["content"])["s"]
    assert choice["finish_reason"] == "stop" and len(value) == 7 and value.endswith("aaaa")


@pytest.mark.parametrize("newline", ["\n", " "])
def test_whitespace_is_single_spaced_by_default_and_bounded_when_free(api, newline):
    base, tok = api
    push = {"logit_bias": {_token(tok, newline): 100}}
    schema = {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"type": "null"}}, "required": ["a", "b"],
              "additionalProperties": False}
    rf = {"response_format": {"type": "json_schema", "json_schema": {"name": "ab", "schema": schema}}}
    text = _chat(base, rf | push).json()["choices"][0]["message"]["content"]
    assert json.loads(text) == {"a": json.loads(text)["a"], "b": None}
    assert text.startswith('{"a": ') and ", " in text and "\n" not in text and "  " not in text
    text = _chat(base, rf | push | {"structured_outputs": {"json_whitespace": "compact"}}).json()["choices"][0]["message"]["content"]
    assert " " not in text and "\n" not in text
    r = _chat(base, rf | push | {"structured_outputs": {"json_whitespace": "any"}, "max_tokens": 400})
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "stop", "bounded whitespace ends"
    assert max(_runs(choice["message"]["content"], newline)) == ANY_WHITESPACE_MAX
    assert json.loads(choice["message"]["content"])["b"] is None


def _runs(text: str, ch: str) -> list[int]:
    """The length of the run of `ch` ending at each character."""
    out, n = [0], 0
    for c in text:
        n = n + 1 if c == ch else 0
        out.append(n)
    return out


def test_tool_arguments_are_bounded_too(api):
    base, tok = api
    tool = {"type": "function", "function": {"name": "count", "parameters": NUMBER}}
    body = {"tools": [tool], "tool_choice": "required", "logit_bias": {_token(tok, "1"): 100}, "max_tokens": 120}
    r = _chat(base, body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    args = json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"])
    assert args == {"n": int("1" * DEFAULT_MAX_NUMBER_DIGITS)}


def test_json_options_without_a_constraint_and_two_constraints_are_refused(api):
    base, _ = api
    r = _chat(base, {"structured_outputs": {"json_whitespace": "any"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"
    r = _chat(base, {"structured_outputs": {"regex": "a+", "choice": ["a"]}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs"
    r = _chat(base, {"structured_outputs": {"max_number_digits": 40, "json": NUMBER}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "structured_outputs.max_number_digits"


def test_the_string_bound_holds_under_token_recycling_with_identical_output(tiny_llama):
    """The bound follows accepted tokens with rollback, so draft verification (Token Recycling)
    gives constrained greedy decoding's output, token for token."""
    from freelunch.config import EngineConfig
    from freelunch.engine.engine import Engine
    from freelunch.engine.request import ConstraintSpec, GenerationRequest, SamplingParams
    from freelunch.models.loader import load_model, resolve_source

    folder, _ = tiny_llama
    loaded = load_model(resolve_source(str(folder)), "float32")
    engine = Engine(loaded, EngineConfig(kv_cache_gib=0.05, max_model_len=512, max_step_cost=float("inf")))
    tok = loaded.tokenizer
    push = {int(_token(tok, "a")): 100.0, int(_token(tok, "\"")): 100.0}
    spec = ConstraintSpec("json_schema", json.dumps({"type": "array", "items": {"type": "string"}, "maxItems": 3}), max_string=6)
    outs = {}
    for name, methods in (("greedy", {}), ("tr", {"speculative": {"method": "token_recycling", "tree": 6}})):
        engine.add_request(GenerationRequest(name, tok.encode("List:"), SamplingParams(max_tokens=80, temperature=0),
                                             methods, constraint=spec, logit_bias=push))
        tokens = []
        while engine.has_work():
            for o in engine.step():
                tokens += o.new_token_ids
        outs[name] = tokens
    assert outs["greedy"] == outs["tr"]
    values = json.loads(tok.decode(outs["greedy"], skip_special_tokens=True))
    assert values and all(len(v) <= 6 for v in values) and any(len(v) == 6 for v in values)
