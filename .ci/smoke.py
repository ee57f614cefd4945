"""A new user's first requests against `freelunch serve`, with the standard library only (it runs in
a venv holding nothing but the README's plain install, and in the Docker image at build time).

    python .ci/smoke.py --serve "freelunch serve --port 8765"   # starts it, checks, stops it
    python .ci/smoke.py --url http://127.0.0.1:8000             # a server already running

Checks: /ready; a chat; the README's `.parse()` example as the SDK sends it (a JSON schema) finishes
with a valid object at max_tokens 200; a required tool call comes back as tool_calls with JSON
arguments; a misspelt option is a 400 naming it; /docs loads nothing from another host.
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

CITY = {
    "type": "object",
    "properties": {"name": {"title": "Name", "type": "string"}, "population": {"title": "Population", "type": "integer"}},
    "required": ["name", "population"],
    "title": "City",
    "additionalProperties": False,
}
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The current weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def call(url: str, path: str, body: dict | None = None, timeout: float = 300) -> tuple[int, dict | str]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as r:
            status, text = r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        status, text = e.code, e.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def wait_ready(url: str, server: subprocess.Popen | None, limit: float) -> None:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if server is not None and server.poll() is not None:
            raise SystemExit(f"smoke: the server exited with {server.returncode} before it was ready")
        try:
            if call(url, "/ready", timeout=5)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(1)
    raise SystemExit(f"smoke: the server was not ready within {limit:g} s")


def check(name: str, ok: bool, detail: object) -> bool:
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {str(detail)[:300]}", flush=True)
    return ok


def smoke(url: str) -> bool:
    model = call(url, "/v1/models")[1]["data"][0]["id"]
    chat = {"model": model, "temperature": 0, "max_tokens": 200}
    results = []
    status, r = call(url, "/v1/chat/completions", chat | {"messages": [{"role": "user", "content": "What is the capital of France?"}], "max_tokens": 32})
    results.append(check("chat", status == 200 and bool(r["choices"][0]["message"]["content"]), r))

    fmt = {"type": "json_schema", "json_schema": {"name": "City", "schema": CITY, "strict": True}}
    status, r = call(url, "/v1/chat/completions", chat | {"messages": [{"role": "user", "content": "Describe Paris."}], "response_format": fmt})
    ok = status == 200 and r["choices"][0]["finish_reason"] == "stop"
    if ok:
        city = json.loads(r["choices"][0]["message"]["content"])
        ok = set(city) == {"name", "population"} and isinstance(city["name"], str) and isinstance(city["population"], int)
    results.append(check("JSON schema (the README's .parse() example)", ok, r))

    body = chat | {"messages": [{"role": "user", "content": "What is the weather in Paris?"}], "tools": [WEATHER], "tool_choice": "required"}
    status, r = call(url, "/v1/chat/completions", body)
    ok = status == 200 and r["choices"][0]["finish_reason"] == "tool_calls"
    if ok:
        calls = r["choices"][0]["message"]["tool_calls"]
        ok = calls[0]["function"]["name"] == "get_weather" and isinstance(json.loads(calls[0]["function"]["arguments"]), dict)
    results.append(check("tool call", ok, r))

    status, r = call(url, "/v1/chat/completions", chat | {"messages": [{"role": "user", "content": "hi"}], "speculatve": {}})
    results.append(check("a misspelt option is a 400 naming it", status == 400 and r["error"]["param"] == "speculatve", r))

    status, page = call(url, "/docs")
    hosts = set(re.findall(r"https?://([a-z0-9.-]+)", page if isinstance(page, str) else "")) - {"127.0.0.1", "localhost"}
    results.append(check("/docs loads nothing from another host", status == 200 and not hosts, hosts or "local"))

    # the playground page and its script ship in the package (package data), not only in a checkout
    pages = [call(url, path) for path in ("/", "/playground/app.js", "/playground/style.css")]
    ok = all(status == 200 and isinstance(text, str) and text for status, text in pages) and "playground" in pages[0][1]
    results.append(check("the playground page is served", ok, [status for status, _ in pages]))
    return all(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default=None, help="a running server")
    parser.add_argument("--serve", default=None, help="the command that starts one (its --port decides the URL)")
    parser.add_argument("--ready-timeout", type=float, default=600, help="seconds to wait for /ready")
    args = parser.parse_args()
    server = None
    url = args.url
    if args.serve:
        words = shlex.split(args.serve)
        port = words[words.index("--port") + 1] if "--port" in words else "8000"
        url = f"http://127.0.0.1:{port}"
        server = subprocess.Popen(words)
    try:
        wait_ready(url, server, args.ready_timeout)
        passed = smoke(url)
    finally:
        if server is not None:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    print("smoke: " + ("every check passed" if passed else "a check failed"))
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
