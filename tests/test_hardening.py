"""No request can stall, crash or leak the server: huge prompts, huge headers, lone surrogates,
out-of-range integers, a failing hand-off. Each test failed on the code before these fixes."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import httpx
import pytest
from live_server import live_server, tiny_app

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
USER = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def api(tiny_llama):
    """(base URL, app, worker) of the API over the tiny Llama."""
    folder, _ = tiny_llama
    app, worker = tiny_app(folder)
    with live_server(app) as base:
        yield base, app, worker


def in_flight(base: str, app) -> int:
    return sum(w["in_flight"] for w in httpx.get(base + "/ready").json()["workers"]) + app.state.services.pool.in_flight


# ---- 1. tokenising never blocks the event loop ----------------------------------------------


def test_a_huge_prompt_is_refused_before_tokenising_while_health_answers(api):
    base, app, _ = api
    prompt = "lorem ipsum " * ((7 << 20) // 12)  # ~7 MB, under the 8 MiB body limit
    result: dict = {}

    def post() -> None:
        start = time.monotonic()
        result["r"] = httpx.post(base + COMPLETIONS, json={"prompt": prompt, "max_tokens": 1}, timeout=60)
        result["s"] = time.monotonic() - start

    sender = threading.Thread(target=post)
    sender.start()
    slowest = 0.0
    while sender.is_alive():
        start = time.monotonic()
        assert httpx.get(base + "/health", timeout=5).status_code == 200
        slowest = max(slowest, time.monotonic() - start)
        time.sleep(0.02)
    sender.join()
    r = result["r"]
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert r.json()["error"]["param"] == "prompt"
    assert slowest < 1.0, f"/health took {slowest:.2f} s while the prompt was handled"
    assert result["s"] < 5.0


def test_prompts_are_rendered_and_tokenised_off_the_event_loop(api, monkeypatch):
    base, app, _ = api
    renderer = app.state.services.builder.renderer
    seen: list[tuple[str, bool]] = []

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            seen.append((name, on_loop()))
            return fn(*args, **kwargs)

        return wrapped

    tok = renderer.tokenizer
    monkeypatch.setattr(tok, "encode", spy("encode", tok.encode))
    monkeypatch.setattr(tok, "apply_chat_template", spy("apply_chat_template", tok.apply_chat_template))
    neg = {"guidance": {"scale": 2, "negative_prompt": "a sad story"}}
    assert httpx.post(base + COMPLETIONS, json={"prompt": "hello there", "max_tokens": 2} | neg).status_code == 200
    chat_neg = {"guidance": {"negative_messages": [{"role": "user", "content": "be sad"}]}}
    assert httpx.post(base + CHAT, json={"messages": USER, "max_tokens": 2} | chat_neg).status_code == 200
    names = {name for name, _ in seen}
    assert names == {"encode", "apply_chat_template"} and len(seen) >= 5
    assert not any(loop for _, loop in seen), seen


# ---- 2. request heads are bounded ------------------------------------------------------------


def _raw_exchange(base: str, head: bytes, chunk: int = 1 << 16) -> tuple[bytes, float, int]:
    """Send `head` in chunks until the server answers or closes; (its answer, seconds, bytes sent)."""
    host, port = base.removeprefix("http://").split(":")
    sent = 0
    start = time.monotonic()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.setblocking(False)
        answer = b""
        while sent < len(head):
            try:
                sent += s.send(head[sent : sent + chunk])
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass
            try:
                answer += s.recv(65536)
                if answer:
                    break
            except BlockingIOError:
                time.sleep(0.001)
            except ConnectionResetError:
                break
        s.setblocking(True)
        s.settimeout(5)
        try:
            while True:
                data = s.recv(65536)
                if not data:
                    break
                answer += data
        except (TimeoutError, ConnectionResetError, OSError):
            pass
    return answer, time.monotonic() - start, sent


def test_a_huge_header_is_431_before_it_is_read(api):
    base, *_ = api
    head = b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + b"a" * (64 << 20) + b"\r\n\r\n"
    answer, seconds, sent = _raw_exchange(base, head)
    assert answer.startswith(b"HTTP/1.1 431 "), answer[:200]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_header_fields_too_large"
    assert sent < 8 << 20 and seconds < 3  # refused long before the 64 MB were read
    assert httpx.get(base + "/health").status_code == 200


def test_too_many_headers_are_431(api):
    base, *_ = api
    head = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(500)) + b"\r\n"
    answer, _, _ = _raw_exchange(base, head)
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_ordinary_heads_and_keep_alive_still_work(api):
    base, *_ = api
    with httpx.Client(base_url=base) as c:  # several requests on one connection
        for _ in range(3):
            assert c.get("/health", headers={"X-Pad": "p" * 8000}).status_code == 200
            assert c.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1}).status_code == 200


# ---- 3. lone surrogates ----------------------------------------------------------------------

SURROGATE = "a\ud800b"


@pytest.mark.parametrize(
    "path, body, param",
    [
        (CHAT, {"messages": [{"role": "user", "content": SURROGATE}]}, "messages.0.content"),
        (CHAT, {"messages": [{"role": "user", "content": [{"type": "text", "text": SURROGATE}]}]}, "messages.0.content.0.text"),
        (CHAT, {"messages": [{"role": "user", "content": "x", "name": SURROGATE}]}, "messages.0.name"),
        (CHAT, {"messages": USER, "model": SURROGATE}, "model"),
        (CHAT, {"messages": USER, "stop": [SURROGATE]}, "stop.0"),
        (CHAT, {"messages": USER, "user": SURROGATE}, "user"),
        (CHAT, {"messages": USER, "negative_messages": [{"role": "user", "content": SURROGATE}]}, "negative_messages.0.content"),
        (CHAT, {"messages": USER, "metadata": {SURROGATE: "x"}}, f"metadata.{SURROGATE}"),
        (COMPLETIONS, {"prompt": SURROGATE}, "prompt"),
        (COMPLETIONS, {"prompt": ["ok", SURROGATE]}, "prompt.1"),
        (COMPLETIONS, {"prompt": "x", "stop": SURROGATE}, "stop.0"),
        (COMPLETIONS, {"prompt": "x", "guidance": {"negative_prompt": SURROGATE}}, "guidance.negative_prompt"),
        (COMPLETIONS, {"prompt": "x", "suffix": SURROGATE}, "suffix"),
    ],
)
def test_a_lone_surrogate_is_a_400_and_the_connection_serves_on(api, path, body, param):
    base, app, _ = api
    raw = json.dumps(body | {"max_tokens": 2}).encode()  # ensure_ascii: "\ud800" on the wire, as a client sends it
    with httpx.Client(base_url=base) as c:  # one keep-alive connection
        r = c.post(path, content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400, r.text
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error" and "unicode" in error["message"].lower()
        if not param.startswith("metadata."):
            assert error["param"] == param
        again = c.post(COMPLETIONS, json={"prompt": "hi", "max_tokens": 1})
        assert again.status_code == 200
    assert in_flight(base, app) == 0


# ---- 4. out-of-range integers ----------------------------------------------------------------

BIG = 2**70


@pytest.mark.parametrize(
    "path, extra, param",
    [
        (COMPLETIONS, {"max_tokens": BIG}, "max_tokens"),
        (COMPLETIONS, {"top_k": BIG}, "top_k"),
        (COMPLETIONS, {"n": BIG}, "n"),
        (COMPLETIONS, {"seed": BIG}, "seed"),
        (COMPLETIONS, {"seed": -BIG}, "seed"),
        (COMPLETIONS, {"min_tokens": BIG}, "min_tokens"),
        (COMPLETIONS, {"stop_token_ids": [1, BIG]}, "stop_token_ids.1"),
        (COMPLETIONS, {"logprobs": BIG}, "logprobs"),
        (COMPLETIONS, {"best_of": BIG}, "best_of"),
        (COMPLETIONS, {"prompt": [1, BIG]}, "prompt"),
        (COMPLETIONS, {"prompt": [[1, BIG]]}, "prompt"),
        (COMPLETIONS, {"guidance": {"negative_prompt_ids": [BIG]}}, "guidance.negative_prompt_ids.0"),
        (COMPLETIONS, {"speculative": {"k": BIG}}, "speculative.k"),
        (COMPLETIONS, {"speculative": {"tree": BIG}}, "speculative.tree"),
        (COMPLETIONS, {"moe_contrast": {"weak_rank": BIG}}, "moe_contrast.weak_rank"),
        (COMPLETIONS, {"visual_pruning": {"method": "fastv", "layer": BIG}}, "visual_pruning.layer"),
        (CHAT, {"top_logprobs": BIG, "logprobs": True}, "top_logprobs"),
        (CHAT, {"max_completion_tokens": BIG}, "max_completion_tokens"),
    ],
)
def test_an_out_of_range_integer_is_a_400_that_leaves_nothing_behind(api, path, extra, param):
    base, app, _ = api
    body = ({"messages": USER} if path == CHAT else {"prompt": "hi"}) | {"max_tokens": 2} | extra
    r = httpx.post(base + path, json=body)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"].startswith(param), r.json()
    assert in_flight(base, app) == 0


def test_a_failing_hand_off_releases_everything(api, monkeypatch):
    """Whatever breaks between the API and the worker ends that request cleanly: an error answer,
    its mailbox closed, its admission released; the next request is served."""
    base, app, worker = api

    def broken(request):
        raise TypeError("cannot encode this request")

    monkeypatch.setattr(worker, "_send_add", broken)
    for _ in range(5):
        r = httpx.post(base + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 500 and "cannot encode" in r.json()["error"]["message"]
    assert len(worker.mailboxes) == 0 and in_flight(base, app) == 0
    monkeypatch.undo()
    assert httpx.post(base + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}).status_code == 200



def test_a_second_loop_on_a_driven_engine_is_refused_until_the_first_stops(api):
    """Two loops stepping one engine corrupt it mid-request (vLLM failed a request this way); a
    second worker on a served engine must fail to start, by name, and serving goes on."""
    from freelunch.pool.engine_loop import EngineBusy, EngineLoop
    from freelunch.pool.local_engine import ThreadWorker

    base, _, worker = api
    second = ThreadWorker(worker.engine, "second")
    with pytest.raises(EngineBusy, match="worker-0"):
        second.start()
    assert not second.alive
    assert httpx.post(base + COMPLETIONS, json={"prompt": "hi", "max_tokens": 2}).status_code == 200

    class Idle:  # an engine with nothing to do, to free and take again
        requests: dict = {}
        has_work = staticmethod(lambda: False)

    engine = Idle()
    first, then = EngineLoop(engine, None, "first"), EngineLoop(engine, None, "then")
    first.start()
    with pytest.raises(EngineBusy, match="first"):
        then.start()
    first.stop()
    then.start()  # free once the first loop has stopped
    then.stop()
