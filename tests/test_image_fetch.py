"""Image URLs fetched from `--allowed-image-hosts`, against a local HTTP server on loopback.

Checked: an allowed host's image decodes like the same bytes sent as a data URL (same greedy
tokens and prompt length); unlisted hosts, credentials in the URL, redirects to unlisted hosts,
oversize bodies (declared or streamed), non-200 answers, unreachable hosts and slow servers are
400s with `param` at the content part; the server stays up and serves afterwards; a slow fetch
does not stall the event loop, and images are decoded and preprocessed on worker threads.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from freelunch.api.errors import APIError
from freelunch.api.images import MAX_IMAGE_BYTES, NO_FETCH, ImageLoader
from freelunch.config import ServerConfig
from live_server import free_port, live_server, tiny_app
from test_vlm import N_TOKENS, build_tiny_llava, data_url, random_image

TIMEOUT = 1.0  # the servers' --image-fetch-timeout in these tests
PARAM = "messages.0.content.1.image_url.url"


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


CAT = png(random_image(21, (40, 31)))
DOG = png(random_image(22, (30, 45)))


class Handler(BaseHTTPRequestHandler):
    """HTTP/1.0: a body without Content-Length ends when the connection closes."""

    port = 0

    def log_message(self, *args) -> None:
        pass

    def send(self, status: int, body: bytes = b"", length: bool = True, **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "image/png")
        if length:
            self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        with contextlib.suppress(OSError):  # the fetcher hangs up on bodies over the limit
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        path = self.path
        if path == "/cat.png":
            self.send(200, CAT)
        elif path == "/dog.png":
            self.send(200, DOG)
        elif path == "/huge.png":  # declared too big
            self.send(200, CAT + b"\0" * MAX_IMAGE_BYTES)
        elif path == "/huge-undeclared.png":  # too big, found out while streaming
            self.send(200, b"", length=False)
            chunk = b"\0" * (1 << 20)
            with contextlib.suppress(OSError):  # the fetcher hangs up once over the limit
                for _ in range(MAX_IMAGE_BYTES // len(chunk) + 2):
                    self.wfile.write(chunk)
        elif path == "/host":  # the Host header it was asked with, as the body
            self.send(200, self.headers.get("Host", "").encode())
        elif path == "/text":
            self.send(200, b"hello world")
        elif path == "/redirect-away":  # to another host name of this same server: not listed
            self.send(302, Location=f"http://localhost:{self.port}/cat.png")
        elif path == "/redirect-here":
            self.send(302, Location="/cat.png")
        elif path == "/redirect-loop":
            self.send(302, Location="/redirect-loop")
        elif path == "/slow":  # no answer within the timeout
            time.sleep(3 * TIMEOUT)
            self.send(200, CAT)
        elif path == "/drip":  # each byte in time, the whole far beyond it
            self.send(200, b"", length=False)
            with contextlib.suppress(OSError):
                for b in CAT[:40]:
                    self.wfile.write(bytes([b]))
                    self.wfile.flush()
                    time.sleep(TIMEOUT / 4)
        else:
            self.send(404, b"not found")


@pytest.fixture(scope="module")
def images_host():
    """Base URL of a threaded HTTP server on 127.0.0.1 serving the test images."""
    port = free_port()
    handler = type("BoundHandler", (Handler,), {"port": port})
    httpd = ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def vlm_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-llava-fetch")
    build_tiny_llava(folder)
    return folder


@pytest.fixture(scope="module")
def api(vlm_folder, images_host):
    """(base URL, PromptRenderer) of the API over the tiny LLaVA, fetching from 127.0.0.1 only."""
    config = ServerConfig(allowed_image_hosts=("127.0.0.1", "*.example.invalid"), image_fetch_timeout=TIMEOUT)
    app, _ = tiny_app(vlm_folder, config)
    with live_server(app) as base:
        yield base, app.state.services.builder.renderer


def data_url_of(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def chat(base: str, *urls: str, **body) -> httpx.Response:
    content = [{"type": "text", "text": "Look: "}]
    content += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    body = {"messages": [{"role": "user", "content": content}], "max_tokens": N_TOKENS, "temperature": 0,
            "ignore_eos": True, **body}
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=60)


def test_fetched_image_decodes_like_the_same_data_url(api, images_host):
    base, _ = api
    fetched = chat(base, images_host + "/cat.png", images_host + "/dog.png")
    assert fetched.status_code == 200, fetched.text
    inline = chat(base, data_url_of(CAT), data_url_of(DOG))
    assert inline.status_code == 200, inline.text
    assert fetched.json()["choices"][0]["message"]["content"] == inline.json()["choices"][0]["message"]["content"]
    assert fetched.json()["usage"]["prompt_tokens"] == inline.json()["usage"]["prompt_tokens"]
    # a different image gives a different answer: the fetched bytes are what the model saw
    other = chat(base, images_host + "/dog.png", images_host + "/cat.png")
    assert other.status_code == 200
    assert other.json()["choices"][0]["message"]["content"] != fetched.json()["choices"][0]["message"]["content"]
    # a redirect on the same (listed) host is followed
    redirected = chat(base, images_host + "/redirect-here", images_host + "/dog.png")
    assert redirected.json()["choices"][0]["message"]["content"] == fetched.json()["choices"][0]["message"]["content"]


REFUSALS = [
    ("unlisted-host", "http://localhost:{port}/cat.png", "image host 'localhost' is not in --allowed-image-hosts"),
    ("wildcard-apex", "http://example.invalid/cat.png", "not in --allowed-image-hosts"),
    ("userinfo", "http://user:secret@127.0.0.1:{port}/cat.png", "credentials"),
    ("userinfo-trick", "http://127.0.0.1:{port}\\@localhost/cat.png", "credentials"),
    ("oversize", "{base}/huge.png", f"larger than {MAX_IMAGE_BYTES >> 20} MiB"),
    ("oversize-streamed", "{base}/huge-undeclared.png", f"larger than {MAX_IMAGE_BYTES >> 20} MiB"),
    ("redirect-away", "{base}/redirect-away", "redirects to 'localhost', a host not in --allowed-image-hosts"),
    ("redirect-loop", "{base}/redirect-loop", "redirects more than"),
    ("not-found", "{base}/missing.png", "HTTP 404"),
    ("not-an-image", "{base}/text", "cannot be decoded"),
    ("slow", "{base}/slow", f"took longer than {TIMEOUT:g} s"),
    ("drip", "{base}/drip", f"took longer than {TIMEOUT:g} s"),
    ("unreachable", "http://127.0.0.1:{closed}/cat.png", "failed: ConnectError"),
]


@pytest.mark.parametrize("name,url,message", REFUSALS, ids=[r[0] for r in REFUSALS])
def test_fetch_refusals_are_400_at_the_content_part(api, images_host, name, url, message):
    base, _ = api
    port = images_host.rsplit(":", 1)[1]
    url = url.format(base=images_host, port=port, closed=free_port())
    started = time.monotonic()
    r = chat(base, url)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == PARAM
    assert error["type"] == "invalid_request_error"
    assert message in error["message"], error["message"]
    assert time.monotonic() - started < TIMEOUT + 5


def test_refusal_points_at_the_failing_part_of_several(api, images_host):
    base, _ = api
    r = chat(base, images_host + "/cat.png", images_host + "/missing.png")
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages.0.content.2.image_url.url"


def test_server_stays_up_and_serves_afterwards(api, images_host):
    base, _ = api
    for url in ("/slow", "/huge-undeclared.png", "/redirect-away"):
        assert chat(base, images_host + url).status_code == 400
    assert chat(base, images_host + "/cat.png").status_code == 200
    assert chat(base, data_url(random_image(23, (28, 28)))).status_code == 200
    r = httpx.post(base + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
    assert r.status_code == 200
    assert httpx.get(base + "/ready").status_code == 200


def test_slow_fetch_does_not_stall_other_requests(api, images_host):
    base, _ = api
    result = {}
    slow = threading.Thread(target=lambda: result.setdefault("r", chat(base, images_host + "/slow")))
    slow.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert httpx.get(base + "/health").status_code == 200
    assert time.monotonic() - started < TIMEOUT / 2
    assert slow.is_alive()  # the /health answer came while the fetch was still waiting
    slow.join()
    assert result["r"].status_code == 400


def test_images_are_decoded_and_preprocessed_off_the_event_loop(api, images_host, monkeypatch):
    base, serving = api
    import freelunch.api.images as images

    threads: dict[str, bool] = {}

    def on_loop() -> bool:
        try:
            asyncio.get_running_loop()
            return True
        except RuntimeError:
            return False

    def wrap(name, fn):
        def wrapped(*args, **kwargs):
            threads[name] = on_loop()
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(images, "decode_image", wrap("decode_image", images.decode_image))
    monkeypatch.setattr(images, "open_image", wrap("open_image", images.open_image))
    monkeypatch.setattr(serving.vision, "encode", wrap("encode", serving.vision.encode))
    r = chat(base, images_host + "/cat.png", data_url(random_image(24, (28, 28))))
    assert r.status_code == 200, r.text
    assert threads == {"decode_image": False, "open_image": False, "encode": False}


# ---- without a running server --------------------------------------------------------------


def test_urls_are_refused_by_default():
    loader = ImageLoader()
    with pytest.raises(APIError) as e:
        loader.check("https://example.com/cat.png", "p")
    assert e.value.status == 400 and e.value.param == "p" and e.value.message == NO_FETCH
    assert "--allowed-image-hosts" in NO_FETCH
    assert loader.check("data:image/png;base64,AAAA", "p") is None


def test_host_rules():
    loader = ImageLoader(["Images.Example.com", "*.cdn.example.org", "10.0.0.1", "[::1]"])
    allowed = ["images.example.com", "IMAGES.EXAMPLE.COM", "a.cdn.example.org", "a.b.cdn.example.org", "10.0.0.1", "::1"]
    refused = ["example.com", "x.images.example.com", "cdn.example.org", "evilcdn.example.org", "10.0.0.2", "::2",
               "images.example.com.evil.org"]
    assert all(loader.host_allowed(h) for h in allowed)
    assert not any(loader.host_allowed(h) for h in refused)
    for url in ("ftp://images.example.com/x.png", "https://u@images.example.com/x.png",
                "https://images.example.com:443@evil.org/x.png", "http:///x.png"):
        with pytest.raises(APIError):
            loader._checked(url, "p")
    assert str(loader.check("https://a.cdn.example.org:8443/x.png?y=1", "p")) == "https://a.cdn.example.org:8443/x.png?y=1"


@pytest.mark.parametrize("entry", ["http://example.com", "example.com:80", "example.com/x", "*", "*.", "a..b", "u@h", ""])
def test_bad_host_entries_are_config_errors(entry):
    with pytest.raises(ValueError):
        ServerConfig(allowed_image_hosts=(entry,))
    with pytest.raises(ValueError):
        ServerConfig(image_fetch_timeout=0)


def test_cli_reads_hosts_from_flags_and_env(monkeypatch):
    from freelunch.cli import build_parser
    from freelunch.config import ServerConfig, from_flags

    def read_image_hosts(args):
        return from_flags(ServerConfig, args).allowed_image_hosts

    monkeypatch.setenv("FREELUNCH_ALLOWED_IMAGE_HOSTS", "c.example.com, a.example.com")
    args = build_parser().parse_args(
        ["serve", "--allowed-image-hosts", "a.example.com,b.example.com", "--allowed-image-hosts", "*.d.example.com",
         "--image-fetch-timeout", "2.5"]
    )
    assert read_image_hosts(args) == ("a.example.com", "b.example.com", "*.d.example.com", "c.example.com")
    assert args.image_fetch_timeout == 2.5
    monkeypatch.delenv("FREELUNCH_ALLOWED_IMAGE_HOSTS")
    assert read_image_hosts(build_parser().parse_args(["serve"])) == ()


def test_loader_alone_fetches_and_decodes(images_host):
    loader = ImageLoader(["127.0.0.1"], timeout=TIMEOUT)
    image = asyncio.run(loader.load(images_host + "/cat.png", "p"))
    assert image.mode == "RGB" and image.size == (40, 31)
    with pytest.raises(APIError) as e:
        asyncio.run(ImageLoader(["127.0.0.1"], timeout=TIMEOUT, max_bytes=1000).load(images_host + "/cat.png", "p"))
    assert "larger than 1000 bytes" in e.value.message


def test_a_name_that_resolves_inside_the_network_is_refused(images_host):
    """An allowed host name whose address is loopback, private or link-local is refused (SSRF
    through DNS); an IP literal the operator listed is allowed as it is."""
    port = images_host.rsplit(":", 1)[1]
    loader = ImageLoader(["localhost"], timeout=TIMEOUT)
    with pytest.raises(APIError) as e:
        asyncio.run(loader.load(f"http://localhost:{port}/cat.png", "p"))
    assert "non-public address" in e.value.message and e.value.param == "p"
    for literal in ("10.0.0.7", "169.254.169.254", "::1"):
        with pytest.raises(APIError) as e:
            asyncio.run(ImageLoader(["*.example.com"], timeout=TIMEOUT).address(literal, 80, "p"))
        assert "non-public" in e.value.message


def test_the_fetch_connects_to_the_address_it_checked(images_host, monkeypatch):
    """One lookup per hop, and the connection goes to the address that lookup returned (a name
    that re-resolves elsewhere between check and connect cannot redirect it); the server sees the
    host name in Host."""
    import anyio

    port = int(images_host.rsplit(":", 1)[1])
    lookups = []

    async def resolve(host, port_, **kwargs):
        lookups.append(host)
        return [(2, 1, 6, "", ("127.0.0.1", port_))]  # images.example.test exists nowhere else

    monkeypatch.setattr(anyio, "getaddrinfo", resolve)
    loader = ImageLoader(["images.example.test"], timeout=TIMEOUT, allow_private_addresses=True)
    assert asyncio.run(loader.fetch(httpx.URL(f"http://images.example.test:{port}/host"), "p")) == (
        f"images.example.test:{port}".encode()
    )
    image = asyncio.run(loader.load(f"http://images.example.test:{port}/redirect-here", "p"))
    assert image.size == (40, 31) and lookups == ["images.example.test"] * 3  # /host, then two hops
