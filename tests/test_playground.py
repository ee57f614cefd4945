"""The playground page at / (issue 31): served offline from the package, built from the model card's
methods, and driven for real in headless Chromium (Debian's `chromium`, through Playwright; the
browser test skips, saying why, where either is missing; .ci/run installs both)."""

from __future__ import annotations

import json
import os
import re
import shutil

import httpx
import pytest
from freelunch.config import ServerConfig
from freelunch.methods import method_specs
from live_server import live_server, tiny_app

PAGE_FILES = ("/", "/playground/app.js", "/playground/style.css")
# Token Recycling, as the model card lists it (the package names no method; a test may)
OPTION = "speculative"


def test_the_page_is_served_with_nothing_from_elsewhere(server):
    base = server[0]
    page = httpx.get(base + "/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    links = re.findall(r'(?:src|href)="([^"]*)"', page.text)
    # this server's files by relative URLs (the page also works under a proxy's sub-path), or data:
    assert links and all(link.startswith(("playground/", "data:")) for link in links), links
    for path in PAGE_FILES:
        body = httpx.get(base + path)
        assert body.status_code == 200, path
        assert not re.search(r"https?://|//cdn|@import", body.text), f"{path} loads something from elsewhere"
    assert "/" not in httpx.get(base + "/openapi.json").json()["paths"]  # a page, not part of the API
    assert httpx.head(base + "/").status_code == 200
    assert not re.search(r"""fetch\("/|path: "/""", httpx.get(base + "/playground/app.js").text)  # the API, relative too


def test_the_model_card_lists_the_methods_with_their_schemas(server):
    base, model = server[0], server[1]
    card = httpx.get(base + "/v1/models").json()["data"][0]
    assert card["id"] == model and card["images"] is False  # a text-only model
    methods = {m["option"]: m for m in card["methods"]}
    # every installed method the dense text model can run; none that needs MoE layers or images
    assert set(methods) == {option for option, spec in method_specs().items() if not spec.requires}
    for option, spec in method_specs().items():
        if option not in methods:
            continue
        assert methods[option]["description"] == spec.description
        assert methods[option]["options_schema"] == spec.options.model_json_schema()
        assert methods[option]["requires"] == list(spec.requires)
    assert httpx.get(f"{base}/v1/models/{model}").json()["methods"] == card["methods"]


def test_an_moe_model_card_lists_the_methods_that_need_experts(tmp_path):
    from tiny_models import build_tiny_model

    build_tiny_model(tmp_path, "qwen2_moe", seed=3)
    app, _ = tiny_app(tmp_path)
    with live_server(app) as base:
        card = httpx.get(base + "/v1/models").json()["data"][0]
    needs_moe = {option for option, spec in method_specs().items() if spec.requires == ("moe",)}
    assert needs_moe and needs_moe <= {m["option"] for m in card["methods"]}


def test_a_stream_ends_with_the_usage_and_method_stats_the_page_shows(server):
    base, model = server[0], server[1]
    body = {
        "model": model, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0,
        "stream": True, "stream_options": {"include_usage": True}, OPTION: {},
    }  # fmt: skip
    with httpx.stream("POST", base + "/v1/chat/completions", json=body, timeout=60) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] > 0 and OPTION in usage["method_stats"]


def test_no_playground_leaves_no_page_and_the_api_keys_still_apply(tiny_llama):
    folder = tiny_llama[0]
    app, _ = tiny_app(folder, server_config=ServerConfig(playground=False))
    with live_server(app) as base:
        for path in PAGE_FILES:
            r = httpx.get(base + path)
            assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_endpoint", path
    app, _ = tiny_app(folder, server_config=ServerConfig(api_keys=["s3cret"]))
    with live_server(app) as base:
        assert httpx.get(base + "/").status_code == 200  # the page holds no data: public
        assert httpx.get(base + "/v1/models").status_code == 401  # what it calls is not
        assert httpx.get(base + "/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200


# ---- in a real browser ------------------------------------------------------------------------


def unavailable(why: str) -> None:
    """Skip where the browser is missing, but fail in CI, whose .ci/run installs it."""
    if os.environ.get("CI"):
        pytest.fail(f"{why} in CI")
    pytest.skip(why)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright import sync_api
    except ImportError:
        unavailable("playwright is not installed (the test extra has it)")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        unavailable("no Chromium on PATH: `apt-get install -y chromium` (Debian's package; .ci/run installs it)")
    with sync_api.sync_playwright() as p:
        # the system's Chromium: Playwright downloads no browser of its own (no network at run time)
        browser = p.chromium.launch(executable_path=chromium, headless=True)
        yield browser
        browser.close()


def open_page(browser, base: str, expected_status: str | None = None):
    """A new page at `base`, and the script errors and failed loads it logs (but the statuses expected)."""
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(30_000)
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(str(e)))
    def console(message) -> None:
        if message.type == "error" and not (expected_status and expected_status in message.text):
            problems.append(message.text)

    page.on("console", console)
    page.goto(base + "/")
    return page, problems


def test_compare_mode_in_a_browser(browser, server):
    page, problems = open_page(browser, server[0])
    method = page.locator(f'.method[data-option="{OPTION}"]')
    method.locator(".toggle").check()
    assert method.locator('[data-field="k"]').is_visible()  # its options' fields, from the schema
    page.fill("#prompt", "Say something about cats.")
    page.fill("#max_tokens", "24")
    assert page.is_checked("#compare")
    page.click("#run")
    page.wait_for_selector("body[data-done]", state="attached")
    answers = page.locator(".answer")
    assert answers.count() == 2
    assert answers.nth(0).locator("h2").inner_text() == "Plain"
    assert OPTION in answers.nth(1).locator("h2").inner_text()
    for i in range(2):
        answer = answers.nth(i)
        assert answer.locator(".text").inner_text().strip(), "an empty answer"
        assert re.fullmatch(r"\d+\.\d", answer.locator(".tps td").inner_text()), "no tokens/s"
        assert re.fullmatch(r"\d+ ms", answer.locator(".ttft td").inner_text()), "no time to first token"
        assert answer.locator(".error").is_hidden()
    assert answers.nth(0).locator(".method-stats").count() == 0  # plain decoding reports no method
    stats = answers.nth(1).locator(".method-stats").inner_text()
    assert "Mean accepted tokens per step" in stats and "Steps" in stats, stats
    # Token Recycling is lossless: the greedy answers agree word for word
    assert "identical" in page.inner_text("#summary")
    assert not problems, problems


def test_completion_mode_with_a_json_schema_in_a_browser(browser, server):
    """Completion mode posts a prompt to /v1/completions (no chat fields), with the schema box's
    schema as its response_format, plain and with the method; both answers keep to the schema."""
    page, problems = open_page(browser, server[0])
    sent: list[tuple[str, dict]] = []
    page.on("request", lambda r: sent.append((r.url, r.post_data_json)) if r.method == "POST" else None)
    page.check("input[name=mode][value=completion]")
    assert page.is_hidden("#system")  # the chat-only fields go
    page.locator(f'.method[data-option="{OPTION}"] .toggle').check()
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}
    page.fill("#schema", json.dumps(schema))
    page.fill("#prompt", "The answer, as JSON:")
    page.fill("#max_tokens", "24")
    page.click("#run")
    page.wait_for_selector("body[data-done]", state="attached")
    runs = [body for url, body in sent if body.get("max_tokens") == 24]  # the page's warm-up asks for one token
    assert len(runs) == 2 and all(url.endswith("/v1/completions") for url, body in sent), sent
    for body in runs:
        assert body["prompt"] == "The answer, as JSON:" and "messages" not in body
        assert body["response_format"]["json_schema"]["schema"] == schema
    assert OPTION not in runs[0] and OPTION in runs[1]
    answers = page.locator(".answer")
    for i in range(2):
        text = answers.nth(i).locator(".text").inner_text().strip()
        assert json.loads(text) in ({"ok": True}, {"ok": False}), text
        assert answers.nth(i).locator(".finish td").inner_text() == "stop"
        assert answers.nth(i).locator(".error").is_hidden()
    assert "identical" in page.inner_text("#summary")
    assert not problems, problems


def test_the_page_works_under_a_proxys_sub_path(browser, tiny_llama):
    """Served at /llm/ (as behind a proxy that mounts the server there), the page loads its files and
    calls the API under that path: its URLs are relative."""
    from starlette.applications import Starlette
    from starlette.routing import Mount

    app, _ = tiny_app(tiny_llama[0])
    proxied = Starlette(routes=[Mount("/llm", app=app)], lifespan=lambda _: app.router.lifespan_context(app))  # the pool starts
    with live_server(proxied, ready="/llm/ready") as base:
        assert httpx.get(base + "/").status_code == 404  # nothing of the server's outside /llm
        page, problems = open_page(browser, base + "/llm")
        page.wait_for_selector(f'.method[data-option="{OPTION}"]')  # the card, from /llm/v1/models
        page.uncheck("#compare")
        page.fill("#max_tokens", "4")
        page.click("#run")
        page.wait_for_selector("body[data-done]", state="attached")
        assert page.locator(".answer .text").inner_text().strip() and page.locator(".answer .error").is_hidden()
        assert not problems, problems


def test_the_servers_errors_show_in_the_page(browser, server):
    page, problems = open_page(browser, server[0], expected_status="status of 400")
    method = page.locator(f'.method[data-option="{OPTION}"]')
    method.locator(".toggle").check()
    method.locator('[data-field="k"]').fill("99")  # over the schema's maximum: the server's 400
    page.fill("#max_tokens", "4")
    page.click("#run")
    page.wait_for_selector("body[data-done]", state="attached")
    plain, with_method = page.locator(".answer").nth(0), page.locator(".answer").nth(1)
    assert plain.locator(".error").is_hidden() and plain.locator(".text").inner_text().strip()
    error = with_method.locator(".error")
    assert error.locator(".status").inner_text() == "400"
    assert "less than or equal to 32" in error.locator(".message").inner_text()
    assert f"{OPTION}.k" in error.locator(".param").inner_text()
    page.uncheck("#compare")
    page.fill("#max_tokens", "100000")  # over the context: the server's message, not the page's guess
    method.locator(".toggle").uncheck()
    page.click("#run")
    page.wait_for_selector("body[data-done]", state="attached")
    error = page.locator(".answer .error")
    assert error.locator(".status").inner_text() == "400" and "max_tokens" in error.locator(".message").inner_text()
    assert not problems, problems


def test_a_server_with_an_api_key_asks_for_it(browser, tiny_llama):
    app, _ = tiny_app(tiny_llama[0], server_config=ServerConfig(api_keys=["s3cret"]))
    with live_server(app) as base:
        page, problems = open_page(browser, base, expected_status="status of 401")
        page.wait_for_selector("#banner .status")
        assert page.inner_text("#banner .status") == "401" and page.is_disabled("#run")
        page.fill("#api-key", "s3cret")
        page.click("#connect")
        page.wait_for_selector(f'.method[data-option="{OPTION}"]')
        assert page.is_hidden("#banner") and page.is_enabled("#run")
        page.fill("#max_tokens", "4")
        page.click("#run")
        page.wait_for_selector("body[data-done]", state="attached")
        assert page.locator(".answer .error").first.is_hidden()
        assert page.evaluate("localStorage.length + sessionStorage.length") == 0 and "s3cret" not in page.url
        assert not problems, problems


def test_a_vision_model_takes_an_uploaded_image_and_offers_pruning(browser, tmp_path):
    """The card of a vision model: the image upload appears, and the methods that need a vision side
    (visual pruning), whose stats say how many image tokens were kept."""
    from test_vlm import build_tiny_llava, random_image

    build_tiny_llava(tmp_path / "model")
    random_image(5, (40, 31)).save(tmp_path / "cat.png")
    app, _ = tiny_app(tmp_path / "model")
    with live_server(app) as base:
        page, problems = open_page(browser, base)
        page.wait_for_selector("#image-row:not([hidden])")
        vision_only = [o for o, spec in method_specs().items() if spec.requires == ("vision",)]
        assert vision_only
        method = page.locator(f'.method[data-option="{vision_only[0]}"]')
        method.locator(".toggle").check()
        page.set_input_files("#image", str(tmp_path / "cat.png"))
        page.wait_for_selector("#image-preview:not([hidden])")
        page.fill("#prompt", "What is in the picture?")
        page.fill("#max_tokens", "8")
        page.click("#run")
        page.wait_for_selector("body[data-done]", state="attached")
        answers = page.locator(".answer")
        assert answers.count() == 2 and all(answers.nth(i).locator(".error").is_hidden() for i in range(2))
        assert "Kept image tokens" in answers.nth(1).locator(".method-stats").inner_text()
        assert not problems, problems


def test_on_a_server_with_a_default_method_the_plain_run_opts_out_of_it(browser, tiny_llama):
    """`freelunch serve --speculative token_recycling`: the card says so, the page starts with the
    method on, and its "Plain" run sends the method's off options, so it is plain decoding."""
    app, _ = tiny_app(tiny_llama[0], default_methods={OPTION: {"method": "token_recycling"}})
    with live_server(app) as base:
        card = {m["option"]: m for m in httpx.get(base + "/v1/models").json()["data"][0]["methods"]}
        assert card[OPTION]["server_default"] == {"method": "token_recycling"}
        assert card[OPTION]["off_options"] == method_specs()[OPTION].off_options
        page, problems = open_page(browser, base)
        page.wait_for_selector(f'.method[data-option="{OPTION}"]')
        assert page.locator(f'.method[data-option="{OPTION}"] .toggle').is_checked()
        page.fill("#max_tokens", "16")
        page.click("#run")
        page.wait_for_selector("body[data-done]", state="attached")
        plain, with_method = page.locator(".answer").nth(0), page.locator(".answer").nth(1)
        assert plain.locator(".method-stats").count() == 0  # opted out: no Token Recycling stats
        assert "Mean accepted tokens per step" in with_method.locator(".method-stats").inner_text()
        page.locator(f'.method[data-option="{OPTION}"] .toggle').uncheck()  # switched off: off for both runs
        page.click("#run")
        page.wait_for_selector("body[data-done]", state="attached")
        assert page.locator(".answer .method-stats").count() == 0
        assert not problems, problems
