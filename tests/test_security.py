"""API keys, body limit, rate limits, admission control and timeouts, over a real loopback server."""

import asyncio
import time

import httpx
import openai
import pytest
from live_server import live_server, tiny_app

from freelunch.api.security import key_id
from freelunch.config import ServerConfig

KEY_A, KEY_B = "sk-test-alpha-0123456789", "sk-test-beta-9876543210"
LONG = {"prompt": "hello", "max_tokens": 400, "ignore_eos": True}


def assert_error(r: httpx.Response, status: int, type_: str, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["type"] == type_ and err["message"]
    if code is not None:
        assert err["code"] == code
    return err


@pytest.fixture(scope="module")
def guarded(tiny_llama):
    folder, _ = tiny_llama
    app, worker = tiny_app(folder, ServerConfig(api_keys=(KEY_A, KEY_B), metrics_require_key=True, max_body_bytes=32 * 1024))
    with live_server(app) as base:
        yield base, folder.name, worker


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer sk-wrong"}, {"Authorization": f"Basic {KEY_A}"}, {"Authorization": f"Bearer {KEY_A}x"}, {"Authorization": KEY_A}],
)
def test_v1_routes_refuse_missing_or_wrong_keys(guarded, headers):
    base, _, _ = guarded
    for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions"), ("GET", "/v1/nope")):
        r = httpx.request(method, base + path, headers=headers, json={"prompt": "hi", "max_tokens": 1})
        assert_error(r, 401, "authentication_error", "invalid_api_key")
        assert r.headers["www-authenticate"] == "Bearer"


def test_each_configured_key_works_through_the_openai_sdk(guarded):
    base, model, _ = guarded
    for key in (KEY_A, KEY_B):
        client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)
        out = client.completions.create(model=model, prompt="hello", max_tokens=3)
        assert out.usage.completion_tokens == 3
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=base + "/v1", api_key="sk-nope", max_retries=0).models.list()


def test_probes_stay_open_and_metrics_can_require_a_key(guarded):
    base, _, _ = guarded
    assert httpx.get(base + "/health").status_code == 200
    assert httpx.get(base + "/ready").json()["status"] == "ready"
    assert_error(httpx.get(base + "/metrics"), 401, "authentication_error")
    r = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 200 and "freelunch_workers_alive 1.0" in r.text


def test_oversized_bodies_are_refused_before_parsing(guarded):
    base, _, _ = guarded
    auth = {"Authorization": f"Bearer {KEY_A}"}
    big = {"prompt": "x " * 40_000, "max_tokens": 1}
    assert_error(httpx.post(base + "/v1/completions", json=big, headers=auth), 413, "invalid_request_error", "request_too_large")

    def chunks():  # no content-length: the limit must count the streamed bytes
        for _ in range(64):
            yield b"x" * 1024

    r = httpx.post(base + "/v1/completions", content=chunks(), headers={**auth, "content-type": "application/json"})
    assert_error(r, 413, "invalid_request_error", "request_too_large")
    ok = httpx.post(base + "/v1/completions", json={"prompt": "hello", "max_tokens": 2}, headers=auth)
    assert ok.status_code == 200


def test_rate_limits_per_key_for_requests_and_tokens(tiny_llama):
    folder, _ = tiny_llama
    app, _ = tiny_app(folder, ServerConfig(api_keys=(KEY_A, KEY_B), rate_limit_rpm=4, rate_limit_tpm=100))
    with live_server(app) as base:

        def post(key: str, max_tokens: int) -> httpx.Response:
            body = {"prompt": "hello", "max_tokens": max_tokens}
            return httpx.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})

        # tokens: prompt (1) + max_tokens 40 each; the third would pass 100
        first = post(KEY_A, 40)
        assert first.status_code == 200
        assert first.headers["x-ratelimit-limit-tokens"] == "100"
        assert int(first.headers["x-ratelimit-remaining-tokens"]) == 100 - 41
        assert post(KEY_A, 40).status_code == 200
        err = assert_error(r := post(KEY_A, 40), 429, "rate_limit_error", "rate_limit_exceeded")
        assert "tokens" in err["message"] and 1 <= int(r.headers["retry-after"]) <= 60
        # requests: key B has its own window
        assert [post(KEY_B, 1).status_code for _ in range(4)] == [200] * 4
        err = assert_error(r := post(KEY_B, 1), 429, "rate_limit_error", "rate_limit_exceeded")
        assert "requests" in err["message"] and r.headers["x-ratelimit-remaining-requests"] == "0"
        # a request larger than the whole per-minute budget can never pass: 400, not 429
        assert_error(post(KEY_A, 200), 400, "invalid_request_error", "request_too_large")


async def _stream_until_done(client: httpx.AsyncClient, url: str, body: dict) -> list[str]:
    lines = []
    async with client.stream("POST", url, json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line:
                lines.append(line)
    return lines


def test_a_full_queue_answers_429_with_retry_after(tiny_llama):
    folder, _ = tiny_llama
    app, worker = tiny_app(folder, max_in_flight=2)
    with live_server(app) as base:
        url = base + "/v1/completions"
        assert_error(httpx.post(url, json={"prompt": "hi", "max_tokens": 1, "n": 3}), 400, "invalid_request_error")

        async def scenario():
            async with httpx.AsyncClient(timeout=60) as client:
                running = [asyncio.create_task(_stream_until_done(client, url, LONG)) for _ in range(2)]
                while worker.engine.num_running < 2:
                    await asyncio.sleep(0.01)
                refused = await client.post(url, json={"prompt": "hi", "max_tokens": 1})
                done = await asyncio.gather(*running)
                after = await client.post(url, json={"prompt": "hi", "max_tokens": 1})
                return refused, done, after

        refused, done, after = asyncio.run(scenario())
        assert_error(refused, 429, "rate_limit_error", "server_overloaded")
        assert refused.headers["retry-after"] == "1"
        assert all(lines[-1] == "data: [DONE]" and '"finish_reason": "length"' in lines[-2] for lines in done)
        assert after.status_code == 200


def test_request_timeout_stops_the_generation(server):
    base, _, _, worker = server
    r = httpx.post(base + "/v1/completions", json={**LONG, "timeout": 0.05})
    assert_error(r, 408, "timeout_error", "request_timeout")
    assert r.json()["error"]["param"] == "timeout"
    with httpx.stream("POST", base + "/v1/completions", json={**LONG, "timeout": 0.05, "stream": True}) as s:
        body = s.read().decode()
    assert s.status_code == 408 or ('"code": "request_timeout"' in body and body.endswith("data: [DONE]\n\n"))
    for _ in range(100):  # the abort lands within an engine step
        if not worker.engine.requests:
            break
        time.sleep(0.02)
    assert not worker.engine.requests and worker.engine.blocks.usage == 0.0


def test_a_draining_server_refuses_new_work_and_reports_unready(tiny_llama):
    folder, _ = tiny_llama
    app, _ = tiny_app(folder)
    with live_server(app) as base:
        app.state.services.pool.draining = True
        assert httpx.get(base + "/ready").status_code == 503
        r = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 1})
        assert_error(r, 503, "service_unavailable", "unavailable")
        assert "shutting down" in r.json()["error"]["message"]


def test_token_recycling_tables_are_per_api_key(guarded):
    """One tenant's text must not shape another's drafts; a body cannot pick another's table."""
    base, _, worker = guarded
    body = {"prompt": "hi", "max_tokens": 2, "speculative": {"method": "token_recycling", "scope": "key-someone-else"}}
    r = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY_A}"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "speculative.scope"
    spec = {"method": "token_recycling"}
    for key in (KEY_A, KEY_B):
        body = {"prompt": "one two three one two three", "max_tokens": 6, "temperature": 0, "speculative": spec}
        r = httpx.post(base + "/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"})
        assert r.status_code == 200 and r.json()["usage"]["method_stats"]["speculative"]["steps"] >= 1
    scopes = {scope for scope, _ in worker.engine.info.shared_state["token_recycling"]}
    assert scopes == {key_id(KEY_A), key_id(KEY_B)}


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/openapi.json", "/static-offline-docs/swagger-ui-bundle.js"])
def test_the_api_docs_follow_the_api_keys(guarded, path):
    base, *_ = guarded
    r = httpx.get(base + path)
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(base + path, headers={"Authorization": f"Bearer {KEY_A}"}).status_code == 200


def test_public_docs_open_them_without_a_key(tiny_llama):
    folder, _ = tiny_llama
    app, _ = tiny_app(folder, ServerConfig(api_keys=(KEY_A,), public_docs=True))
    with live_server(app) as base:
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert httpx.get(base + path).status_code == 200
        assert httpx.get(base + "/v1/models").status_code == 401


def test_a_trickled_body_is_cut_at_the_read_timeout(tiny_llama):
    """A client that sends headers and a little of its body, then nothing, gets a 408 and a
    closed connection at --body-read-timeout, not an open connection for as long as it likes."""
    import socket
    from urllib.parse import urlparse

    folder, _ = tiny_llama
    app, _ = tiny_app(folder, ServerConfig(body_read_timeout=1.0))
    with live_server(app) as base:
        url = urlparse(base)
        with socket.create_connection((url.hostname, url.port), timeout=10) as sock:
            head = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
            sock.sendall(head + b'{"prompt": ')
            start = time.monotonic()
            answer = b""
            while b"\r\n\r\n" not in answer or b"}" not in answer:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                answer += chunk
            took = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408") and b"body_timeout" in answer, answer[:300]
        assert 0.9 < took < 5
