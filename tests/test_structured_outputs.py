"""Structured outputs, tools and logit_bias: an output under a schema always validates (unless
cut by max_tokens), tools come back as OpenAI's tool_calls (whole and streamed), constraints
compose with every method exactly, and bad specs are 400s before any decoding.

The tiny models are random: what they write is noise, which the constraint must shape anyway,
so validity here is the grammar's doing, not the model's."""

from __future__ import annotations

import json
import random
import threading
import time

import httpx
import jsonschema
import pytest
from freelunch.config import EngineConfig
from freelunch.engine.engine import Engine
from freelunch.engine.request import ConstraintSpec, GenerationRequest, SamplingParams
from freelunch.models.loader import load_model, resolve_source
from live_server import live_server, tiny_app
from openai import OpenAI
from pydantic import BaseModel, Field

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 12}, "unit": {"enum": ["C", "F"]}},
            "required": ["city", "unit"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 8}}, "required": ["zone"]},
    },
}


@pytest.fixture(scope="module")
def api(tiny_llama):
    folder, _ = tiny_llama
    app, worker = tiny_app(folder, max_model_len=1024)
    with live_server(app) as base:
        yield base, folder.name, worker


def _engine(loaded, **kw) -> Engine:
    kw.setdefault("max_step_cost", float("inf"))
    return Engine(loaded, EngineConfig(kv_cache_gib=0.05, max_model_len=1024, **kw))


def _run(engine: Engine, requests: list[GenerationRequest]) -> dict[str, list[int]]:
    for r in requests:
        engine.add_request(r)
    out: dict[str, list[int]] = {}
    _run.finish, _run.stats = {}, {}
    while engine.has_work():
        for o in engine.step():
            out.setdefault(o.request_id, []).extend(o.new_token_ids)
            if o.finished:
                _run.finish[o.request_id], _run.stats[o.request_id] = o.finish_reason, o.method_stats or {}
    engine.check_no_leaks()
    return out


def _request(rid, ids, spec=None, methods=None, max_tokens=160, **params) -> GenerationRequest:
    params.setdefault("temperature", 0)
    return GenerationRequest(rid, list(ids), SamplingParams(max_tokens=max_tokens, **params), methods or {}, constraint=spec)


# ---- schemas ---------------------------------------------------------------------------------


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """A schema of the kinds OpenAI's strict mode takes (strings bounded so that noise ends)."""
    kinds = ["string", "integer", "number", "boolean", "null", "enum", "const", "anyOf", "array", "object"]
    kind = rng.choice(kinds if depth < 2 else kinds[:7])
    if kind == "string":
        return {"type": "string", "maxLength": rng.randint(1, 8)}
    if kind == "integer":
        return {"type": "integer", "minimum": -50, "maximum": rng.randint(0, 500)}
    if kind == "number":
        return {"type": "number"}
    if kind in ("boolean", "null"):
        return {"type": kind}
    if kind == "enum":
        return {"enum": rng.sample(["red", "green", "blue", "cyan", "x y", "é"], rng.randint(1, 4))}
    if kind == "const":
        return {"const": rng.choice(["yes", 42, True])}
    if kind == "anyOf":
        return {"anyOf": [random_schema(rng, depth + 1), random_schema(rng, depth + 1)]}
    if kind == "array":
        return {"type": "array", "items": random_schema(rng, depth + 1), "minItems": 1, "maxItems": rng.randint(1, 3)}
    props = {f"k{i}": random_schema(rng, depth + 1) for i in range(rng.randint(1, 3))}
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


SCHEMAS = [random_schema(random.Random(seed)) for seed in range(24)]
SCHEMAS.append({  # $ref / $defs, nested
    "$defs": {"item": {"type": "object", "properties": {"sku": {"type": "string", "maxLength": 5}, "n": {"type": "integer", "minimum": 1, "maximum": 9}}, "required": ["sku", "n"], "additionalProperties": False}},
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"$ref": "#/$defs/item"}, "minItems": 1, "maxItems": 2}},
    "required": ["items"],
    "additionalProperties": False,
})


def test_outputs_under_a_schema_validate_greedy_and_sampled(loaded):
    engine = _engine(loaded)
    tok = loaded.tokenizer
    prompts = ["Give me JSON:", "The answer, as data:", "x"]
    requests, schemas = [], {}
    for i, schema in enumerate(SCHEMAS):
        spec = ConstraintSpec("json_schema", json.dumps(schema))
        ids = tok.encode(prompts[i % len(prompts)])
        sampled = {"temperature": 1.3, "top_p": 0.95, "seed": i} if i % 2 else {}
        requests.append(_request(f"s{i}", ids, spec, max_tokens=200, **sampled))
        schemas[f"s{i}"] = schema
    out = _run(engine, requests)
    validated = 0
    for rid, ids in out.items():
        if _run.finish[rid] == "length":
            continue
        assert _run.finish[rid] == "stop"
        jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), schemas[rid])
        validated += 1
    assert validated >= len(SCHEMAS) * 0.75, f"only {validated} of {len(SCHEMAS)} finished within max_tokens"


def test_json_object_regex_and_choice(loaded):
    engine = _engine(loaded)
    tok = loaded.tokenizer
    ids = tok.encode("Answer:")
    out = _run(
        engine,
        [
            _request("obj", ids, ConstraintSpec("json_object", "", "compact"), max_tokens=300),
            _request("re", ids, ConstraintSpec("regex", r"[A-Z][a-z]{2,5}-\d{3}")),
            _request("choice", ids, ConstraintSpec("choice", json.dumps(["alpha", "beta gamma", "delta"]))),
        ],
    )
    text = {rid: tok.decode(t, skip_special_tokens=True) for rid, t in out.items()}
    if _run.finish["obj"] == "stop":
        assert isinstance(json.loads(text["obj"]), dict)
    import re

    assert re.fullmatch(r"[A-Z][a-z]{2,5}-\d{3}", text["re"]) and text["choice"] in ("alpha", "beta gamma", "delta")


# ---- composition with the methods: exact ----------------------------------------------------


@pytest.mark.parametrize("jump_forward", [True, False])
@pytest.mark.parametrize("tree", [None, 6, "2.2.2"])
def test_token_recycling_under_a_schema_equals_constrained_greedy(loaded, tree, jump_forward):
    """Draft nodes the grammar rejects are pruned, forced text is drafted, and each accepted
    token is the argmax of the constrained distribution: the output is constrained greedy's,
    token for token, alone and in a mixed batch."""
    tok = loaded.tokenizer
    spec = ConstraintSpec("json_schema", json.dumps(SCHEMAS[-1]))
    prompts = [tok.encode(p) for p in ("Items:", "A JSON order with items", "x y z")]
    plain = _run(_engine(loaded), [_request(f"r{i}", ids, spec) for i, ids in enumerate(prompts)])
    tr = {"method": "token_recycling", "jump_forward": jump_forward} | ({"tree": tree} if tree else {})
    mixed = [_request(f"r{i}", ids, spec, {"speculative": tr}) for i, ids in enumerate(prompts)]
    mixed.append(_request("plain", prompts[0], None, max_tokens=12))
    got = _run(_engine(loaded), mixed)
    assert {k: v for k, v in got.items() if k != "plain"} == plain
    stats = _run.stats["r0"]
    assert stats["speculative"]["steps"] >= 1 and "structured_output" in stats
    if jump_forward:
        assert sum(s["speculative"]["jump_forward_tokens"] for r, s in _run.stats.items() if r != "plain") > 0


def test_token_recycling_can_draft_the_grammar_s_end(loaded):
    """A draft may reach the grammar's stop token (a table that has seen the answer drafts all of
    it, EOS included): the walk ends there, nothing is asked of a terminated grammar, and the
    output is still constrained greedy's."""
    tok = loaded.tokenizer
    spec = ConstraintSpec("choice", json.dumps(["alpha beta gamma delta", "omega"]))
    ids = tok.encode("Pick one:")
    expected = _run(_engine(loaded), [_request("r", ids, spec)])["r"]
    engine = _engine(loaded)
    tr = {"speculative": {"method": "token_recycling", "tree": 8}}
    for attempt in range(3):  # the table learns the answer, then drafts it to its end
        assert _run(engine, [_request(f"r{attempt}", ids, spec, tr)])[f"r{attempt}"] == expected
    assert _run.stats["r2"]["speculative"]["accepted_tokens"] > 0


def test_guidance_and_moe_contrast_outputs_validate(loaded, tiny_llama):
    tok = loaded.tokenizer
    schema = SCHEMAS[-1]
    spec = ConstraintSpec("json_schema", json.dumps(schema))
    ids = tok.encode("Order:")
    guided = _request("g", ids, spec, {"guidance": {"scale": 2.0, "negative_prompt_ids": tok.encode("nothing")}})
    out = _run(_engine(loaded), [guided])
    assert _run.finish["g"] == "stop" and _run.stats["g"]["guidance"]["extra_rows"] == 1
    jsonschema.validate(json.loads(tok.decode(out["g"], skip_special_tokens=True)), schema)


def test_moe_contrast_output_validates(tmp_path):
    from tiny_models import build_tiny_model

    build_tiny_model(tmp_path, "mixtral", seed=3)
    moe = load_model(resolve_source(str(tmp_path)), "float32")
    tok = moe.tokenizer
    schema = SCHEMAS[-1]
    req = _request("m", tok.encode("Order:"), ConstraintSpec("json_schema", json.dumps(schema)), {"moe_contrast": {"beta": 0.5}})
    out = _run(_engine(moe), [req])
    assert _run.finish["m"] == "stop" and _run.stats["m"]["moe_contrast"]["extra_rows"] == 1
    jsonschema.validate(json.loads(tok.decode(out["m"], skip_special_tokens=True)), schema)


# ---- over HTTP: OpenAI's and vLLM's fields, the SDK ---------------------------------------


def test_sdk_parse_with_a_pydantic_model(api):
    base, model, _ = api

    class Person(BaseModel):
        name: str = Field(max_length=10)  # bounded: the tiny model writes noise until a string ends
        age: int

    client = OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    r = client.beta.chat.completions.parse(
        model=model, messages=[{"role": "user", "content": "Alice is 30."}], response_format=Person, max_tokens=400, temperature=0
    )
    choice = r.choices[0]
    assert choice.finish_reason == "stop" and isinstance(choice.message.parsed, Person)
    assert "structured_output" in r.usage.model_extra["method_stats"]


@pytest.mark.parametrize(
    "field",
    [
        {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMAS[-1], "strict": True}}},
        {"structured_outputs": {"json": SCHEMAS[-1]}},
        {"structured_outputs": {"json": json.dumps(SCHEMAS[-1]), "disable_any_whitespace": True}},
    ],
)
def test_schema_on_both_endpoints(api, field):
    base, *_ = api
    for path, body in ((CHAT, {"messages": [{"role": "user", "content": "Order"}]}), (COMPLETIONS, {"prompt": "Order:"})):
        r = httpx.post(base + path, json=body | field | {"max_tokens": 300, "temperature": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["message"]["content"] if path == CHAT else choice["text"]
        assert choice["finish_reason"] == "stop"
        jsonschema.validate(json.loads(text), SCHEMAS[-1])


def test_logit_bias_forces_and_bans(loaded, api):
    """OpenAI's semantics: the bias is added to the logits before selection; +100 forces a token
    under greedy decoding, -100 bans it."""
    tok = loaded.tokenizer
    ids = tok.encode("hello there")
    engine = _engine(loaded)
    free = _run(engine, [_request("free", ids, max_tokens=4)])["free"]
    forced = GenerationRequest("forced", ids, SamplingParams(max_tokens=4, temperature=0), logit_bias={42: 100.0})
    banned = GenerationRequest("banned", ids, SamplingParams(max_tokens=4, temperature=0), logit_bias={free[0]: -100.0})
    out = _run(engine, [forced, banned])
    assert out["forced"] == [42] * 4 and out["banned"][0] != free[0]
    base, *_ = api
    r = httpx.post(base + COMPLETIONS, json={"prompt": "hello", "max_tokens": 3, "temperature": 0, "logit_bias": {"42": 100}})
    assert r.status_code == 200 and r.json()["usage"]["method_stats"]["structured_output"]["masked_tokens"] == 3


# ---- tools ---------------------------------------------------------------------------------


def test_named_and_required_tool_calls_validate(api):
    base, model, _ = api
    client = OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    schema = WEATHER["function"]["parameters"]
    for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
        r = client.chat.completions.create(
            model=model, messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER, TIME],
            tool_choice=choice, max_tokens=300, temperature=0, parallel_tool_calls=False,
        )
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.id.startswith("call_") and call.type == "function"
        if choice != "required":
            assert call.function.name == "get_weather"
        target = WEATHER if call.function.name == "get_weather" else TIME
        jsonschema.validate(json.loads(call.function.arguments), target["function"]["parameters"])
    assert schema == WEATHER["function"]["parameters"]


def test_parallel_calls_and_streamed_deltas_reassemble(api):
    """Required calls with parallel_tool_calls: the SDK's stream accumulator rebuilds the same
    calls the non-streamed response holds (ids aside)."""
    base, model, _ = api
    client = OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Weather and time?"}], tools=[WEATHER, TIME],
                  tool_choice="required", max_tokens=400, temperature=0)
    whole = client.chat.completions.create(**kwargs).choices[0]
    with client.beta.chat.completions.stream(**kwargs) as stream:
        for _ in stream:
            pass
        streamed = stream.get_final_completion().choices[0]
    assert whole.finish_reason == streamed.finish_reason == "tool_calls"
    assert [(c.function.name, c.function.arguments) for c in whole.message.tool_calls] == [
        (c.function.name, c.function.arguments) for c in streamed.message.tool_calls
    ]
    assert (whole.message.content or "") == (streamed.message.content or "")


def test_a_call_cut_by_max_tokens_never_leaks_its_markup(api):
    """A call cut by max_tokens: reported beside finish_reason "length" (`cut_tool_call`), and
    `content` holds no markup, whole or streamed."""
    base, model, _ = api
    client = OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
    kwargs = dict(model=model, messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER],
                  tool_choice="required", temperature=0, max_tokens=20)
    cut = client.chat.completions.create(**kwargs).choices[0]
    assert cut.finish_reason == "length" and not cut.message.tool_calls and cut.message.content is None
    report = cut.model_extra["cut_tool_call"]
    assert report["name"] == "get_weather" and report["text"].startswith('{"name": "get_weather"')
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert not "".join(c.choices[0].delta.content or "" for c in chunks)
    assert not any(c.choices[0].delta.tool_calls for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "length" and chunks[-1].choices[0].model_extra["cut_tool_call"] == report


def test_parallel_calls_cut_inside_the_second_keep_the_first():
    from freelunch.api import tool_calls

    first = '<tool_call>\n{"name": "get_time", "arguments": {"zone": "UTC"}}\n</tool_call>'
    text = f'{first}\n<tool_call>\n{{"name": "get_weather", "arguments": {{"city": "Par'
    content, calls, cut = tool_calls.parse(text)
    assert content == "" and [c["function"]["name"] for c in calls] == ["get_time"]
    assert cut == {"name": "get_weather", "text": '{"name": "get_weather", "arguments": {"city": "Par'}
    parser, streamed, deltas = tool_calls.StreamParser(), "", []
    for i in range(0, len(text), 5):
        piece, calls_now = parser.feed(text[i : i + 5])
        streamed, deltas = streamed + piece, deltas + calls_now
    piece, calls_now = parser.feed("", final=True)
    assert streamed + piece == "" and parser.cut == cut
    assert [d["function"]["name"] for d in deltas + calls_now if "name" in d.get("function", {})] == ["get_time"]
    assert tool_calls.parse("plain text") == ("plain text", [], None)


def test_a_conversation_with_tool_results(api):
    """An assistant's earlier call and the tool's result are rendered for the model (Hermes:
    the default model's template has no tools), and the next turn answers."""
    base, model, worker = api
    messages = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "C"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees, sunny"},
    ]
    r = httpx.post(base + CHAT, json={"model": model, "messages": messages, "tools": [WEATHER], "tool_choice": "none", "max_tokens": 8})
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["finish_reason"] in ("stop", "length")
    auto = httpx.post(base + CHAT, json={"model": model, "messages": messages, "tools": [WEATHER], "max_tokens": 40, "temperature": 0})
    assert auto.status_code == 200, auto.text  # auto: the model may answer or call


def test_tool_prompt_and_history_are_rendered_for_a_template_without_tools(api):
    base, model, worker = api
    from freelunch.api.rendering import _hermes_messages

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}]},
        {"role": "tool", "content": "rain", "tool_call_id": "c"}]
    out = _hermes_messages(messages, [WEATHER])
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"] and '"get_weather"' in out[0]["content"]
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>' in out[2]["content"]
    assert out[3]["content"] == "<tool_response>\nrain\n</tool_response>"


# ---- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, extra, param",
    [
        (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": 5}}}}, "response_format"),
        (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/$defs/nope"}}}}, "response_format"),
        (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema"),
        (CHAT, {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"enum": [f"v{i}" for i in range(20000)]}}}}, "response_format"),
        (COMPLETIONS, {"structured_outputs": {"grammar": "root ::= x"}}, "structured_outputs"),
        (COMPLETIONS, {"structured_outputs": {"regex": "(a"}}, "structured_outputs"),
        (COMPLETIONS, {"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
        (COMPLETIONS, {"structured_outputs": {"choice": []}}, "structured_outputs.choice"),
        (COMPLETIONS, {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "structured_outputs"),
        (COMPLETIONS, {"logit_bias": {"999999999": 5}}, "logit_bias.999999999"),
        (COMPLETIONS, {"logit_bias": {"12": 101}}, "logit_bias.12"),
        (COMPLETIONS, {"logit_bias": {"twelve": 1}}, "logit_bias.twelve"),
        (COMPLETIONS, {"response_format": {"type": "json_object"}, "ignore_eos": True}, "ignore_eos"),
        (CHAT, {"tool_choice": "required"}, "tool_choice"),
        (CHAT, {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
        (CHAT, {"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools.0.function.name"),
    ],
)
def test_bad_specs_are_400s_naming_the_parameter(api, path, extra, param):
    base, *_ = api
    body = ({"messages": [{"role": "user", "content": "x"}]} if path == CHAT else {"prompt": "x"}) | {"max_tokens": 4}
    r = httpx.post(base + path, json=body | extra)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.json()


def test_a_heavy_grammar_does_not_slow_other_requests(api):
    """Compiling runs off the event loop: plain requests and /health answer meanwhile."""
    base, *_ = api
    schema = {"type": "object", "properties": {f"p{i}": {"anyOf": [{"type": "integer"}, {"enum": [f"e{j}" for j in range(60)]}]} for i in range(150)}}
    result = {}

    def heavy():
        result["r"] = httpx.post(base + COMPLETIONS, json={"prompt": "x", "max_tokens": 2, "structured_outputs": {"json": schema}}, timeout=60)

    t = threading.Thread(target=heavy)
    t.start()
    slowest = 0.0
    while t.is_alive():
        start = time.monotonic()
        assert httpx.get(base + "/health").status_code == 200
        slowest = max(slowest, time.monotonic() - start)
        time.sleep(0.01)
    t.join()
    assert result["r"].status_code in (200, 400)
    assert slowest < 0.5
