"""/docs and /redoc work with no network: every script, stylesheet and image they load is served
by this server from the package's files; /openapi.json documents the responses the server sends."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from urllib.parse import urljoin, urlparse

import httpx
import pytest


class _Assets(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append(value)


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_doc_pages_load_only_from_this_server(server, page):
    base, *_ = server
    r = httpx.get(base + page)
    assert r.status_code == 200 and "text/html" in r.headers["content-type"]
    parser = _Assets()
    parser.feed(r.text)
    scripts = re.findall(r"<script[^>]*src=['\"]([^'\"]+)", r.text)
    assert scripts, "the page loads its viewer from a script"
    for url in parser.urls + scripts:
        absolute = urljoin(base + page, url)
        assert urlparse(absolute).netloc == urlparse(base).netloc, f"{page} loads {url} from elsewhere"
        assert httpx.get(absolute).status_code == 200, url
    # inline script and style: no URL of another host (fonts, validators, CDNs)
    assert not re.findall(r"https?://(?!127\.0\.0\.1)[a-z0-9.-]+", r.text.replace(base, ""))
    assert "/openapi.json" in r.text


def test_openapi_documents_the_errors_and_bodies_the_server_sends(server):
    base, *_ = server
    spec = httpx.get(base + "/openapi.json").json()
    for path in ("/v1/chat/completions", "/v1/completions"):
        responses = spec["paths"][path]["post"]["responses"]
        assert "422" not in responses, "invalid requests are 400s"
        assert {"200", "400", "401", "404", "408", "413", "429", "500", "503"} <= set(responses)
        error = responses["400"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        assert set(spec["components"]["schemas"][error]["properties"]) == {"error"}
        body = responses["200"]["content"]["application/json"]["schema"]["$ref"].rsplit("/", 1)[-1]
        assert {"choices", "usage"} <= set(spec["components"]["schemas"][body]["properties"])
        assert "text/event-stream" in responses["200"]["content"]
    assert "HTTPValidationError" not in spec["components"]["schemas"]
    # and it is what the server answers: a bad value is a 400 in that shape
    r = httpx.post(base + "/v1/chat/completions", json={"messages": [], "max_tokens": 1})
    assert r.status_code == 400 and set(r.json()["error"]) == {"message", "type", "param", "code"}
