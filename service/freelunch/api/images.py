"""Image inputs of chat requests: inline `data:` URLs, or http(s) URLs on the hosts the server
allows (`--allowed-image-hosts`), decoded with Pillow under deliberate limits, then preprocessed by
the checkpoint's own transformers processor, so that the pixel values and the number of image
tokens are exactly what transformers would compute. Decoding and preprocessing run on worker
threads, never on the event loop.

Every refusal is a 400 whose `param` points at the offending content part.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import ipaddress
import json
import socket
import threading
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import anyio
import httpx
from PIL import Image

from freelunch.api.errors import APIError
from freelunch.config import image_host_pattern
from freelunch.engine.messages import PIXEL_DTYPES, ImageInput

MAX_IMAGES_PER_REQUEST = 8
MAX_IMAGE_BYTES = 6 << 20  # an image file, inline (decoded base64) or fetched
MAX_IMAGE_PIXELS = 4096 * 4096
# Pillow decoders tried, and the MIME types a data URL may declare (image/jpg: a common misspelling)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")

# Set deliberately: Pillow's own decompression-bomb limit, which `decode_image` enforces strictly.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
_OPEN_LOCK = threading.Lock()  # held while Pillow reads a header, not while it decodes
MAX_REDIRECTS = 3  # each hop's host must be allowed too
NO_FETCH = (
    "fetching images from URLs is not enabled on this server (see --allowed-image-hosts): "
    "send the image inline as a data: URL (base64)"
)


def url_scheme(url: str) -> str:
    return url.split(":", 1)[0].lower() if ":" in url else ""


def decode_image(url: str, param: str) -> Image.Image:
    """A `data:image/...;base64,...` URL -> an RGB image; APIError(400, param) for anything else
    (http(s) URLs never get here: `ImageLoader.check` fetches or refuses them first)."""
    if url_scheme(url) != "data":
        raise APIError(400, "an image must be a data: URL (data:image/png;base64,...)", param)
    header, _, payload = url[5:].partition(",")
    mime, _, encoding = header.partition(";")
    if mime.lower() not in MIME_TYPES or encoding.lower() != "base64":
        raise APIError(400, f"image data URLs must be base64 {', '.join(MIME_TYPES)}, not `{header[:64]}`", param)
    if len(payload) > (MAX_IMAGE_BYTES * 4) // 3 + 4:
        raise APIError(400, f"the image is larger than {MAX_IMAGE_BYTES >> 20} MiB", param)
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise APIError(400, f"the image is not valid base64: {e}", param) from e
    return open_image(data, param)


def open_image(data: bytes, param: str) -> Image.Image:
    """An image file's bytes -> an RGB image (its first frame); APIError(400, param) if Pillow cannot."""
    try:
        # The lock: this runs on worker threads, and warnings' filters are process-wide.
        with _OPEN_LOCK, warnings.catch_warnings():
            # Pillow checks the size from the header, before decoding: above the limit it warns
            # (an error here) and above twice the limit it refuses
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=FORMATS)
        image.load()  # the first frame of an animation
        return image.convert("RGB")
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise APIError(400, f"the image has more than {MAX_IMAGE_PIXELS} pixels: {e}", param) from e
    except Exception as e:  # Pillow raises many types for corrupt or unsupported data
        raise APIError(400, f"the image cannot be decoded (accepted: {', '.join(FORMATS)}): {e}", param) from e


class ImageLoader:
    """Content parts' image URLs -> RGB images. `data:` URLs are decoded; http(s) URLs are fetched
    only from the allowed hosts (exact host names, or `*.domain` subdomain rules), without
    credentials, within `timeout` seconds for the whole fetch and `max_bytes` of body, following
    at most MAX_REDIRECTS redirects and only to allowed hosts. Decoding runs on a worker thread."""

    def __init__(
        self,
        allowed_hosts: Iterable[str] = (),
        timeout: float = 10.0,
        max_bytes: int = MAX_IMAGE_BYTES,
        allow_private_addresses: bool = False,
    ) -> None:
        patterns = {image_host_pattern(h) for h in allowed_hosts}
        self.exact = frozenset(h for h in patterns if not h.startswith("*."))
        self.suffixes = tuple(sorted(h[1:] for h in patterns if h.startswith("*.")))  # ".example.com"
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.allow_private_addresses = allow_private_addresses

    def host_allowed(self, host: str) -> bool:
        """Exact names (and IP addresses) match exactly; `*.domain` rules match host names only."""
        host = host.lower()
        if host in self.exact:
            return True
        try:
            ipaddress.ip_address(host)
            return False
        except ValueError:
            return any(host.endswith(s) for s in self.suffixes)

    def check(self, url: str, param: str) -> httpx.URL | None:
        """Refusals that need no I/O, so that a request fails before anything is fetched: the
        parsed URL for http(s) ones on allowed hosts, None for data: URLs (decoded by `load`)."""
        if url_scheme(url) not in ("http", "https"):
            return None  # data: URLs, and decode_image's refusal of any other scheme
        if not self.exact and not self.suffixes:
            raise APIError(400, NO_FETCH, param)
        return self._checked(url, param)

    def _checked(self, url: str | httpx.URL, param: str, redirected: bool = False) -> httpx.URL:
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError) as e:
            raise APIError(400, f"the image URL is not a valid URL: {e}", param) from e
        via = " (redirect target)" if redirected else ""
        if parsed.scheme not in ("http", "https"):
            raise APIError(400, f"image URLs must be http(s) or data: URLs, not `{parsed.scheme}:`{via}", param)
        if parsed.userinfo:
            raise APIError(400, f"image URLs must not carry credentials (user:password@){via}", param)
        host = parsed.raw_host.decode("ascii", "replace").lower()
        if not host:
            raise APIError(400, f"the image URL has no host{via}", param)
        if not self.host_allowed(host):
            if redirected:
                raise APIError(400, f"the image URL redirects to '{host}', a host not in --allowed-image-hosts", param)
            raise APIError(400, f"image host '{host}' is not in --allowed-image-hosts", param)
        return parsed

    async def load(self, url: str, param: str) -> Image.Image:
        """One image, decoded on a worker thread (a big image must not stall other requests)."""
        checked = self.check(url, param)
        if checked is None:
            return await anyio.to_thread.run_sync(decode_image, url, param)
        data = await self.fetch(checked, param)
        return await anyio.to_thread.run_sync(open_image, data, param)

    async def load_all(self, refs: list[tuple[str, str]]) -> list[Image.Image]:
        """(url, param) pairs -> images, loaded concurrently; the first failure in order is raised."""
        if not refs:
            return []
        results = await asyncio.gather(*(self.load(u, p) for u, p in refs), return_exceptions=True)
        for r in results:
            if isinstance(r, BaseException):
                raise r
        return results  # type: ignore[return-value]

    async def fetch(self, url: httpx.URL, param: str) -> bytes:
        """An allowed URL's body: status 200 only, redirects re-checked hop by hop, at most
        `max_bytes` (checked while streaming), within `timeout` seconds in all."""
        host = url.raw_host.decode("ascii", "replace")
        try:
            with anyio.fail_after(self.timeout):
                # trust_env=False: no proxies or .netrc credentials from the server's environment
                async with httpx.AsyncClient(follow_redirects=False, timeout=self.timeout, trust_env=False) as client:
                    for _ in range(MAX_REDIRECTS + 1):
                        host = url.raw_host.decode("ascii", "replace")
                        body, location = await self._get(client, url, host, param)
                        if location is None:
                            return body
                        url = self._checked(url.join(location), param, redirected=True)
            raise APIError(400, f"the image URL redirects more than {MAX_REDIRECTS} times", param)
        except (TimeoutError, httpx.TimeoutException) as e:
            raise APIError(400, f"fetching the image from '{host}' took longer than {self.timeout:g} s", param) from e
        except (httpx.HTTPError, httpx.InvalidURL, httpx.StreamError, OSError, ValueError) as e:
            raise APIError(400, f"fetching the image from '{host}' failed: {type(e).__name__}: {e}", param) from e

    async def address(self, host: str, port: int, param: str) -> str:
        """The address to connect to for `host`, looked up once here and checked: never a
        loopback, private, link-local or otherwise non-public one (a public name that resolves
        inside the network: SSRF, DNS rebinding), unless the operator allowed that very address
        (an IP literal in --allowed-image-hosts) or private addresses (--allow-private-image-addresses)."""
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            literal = None
        if literal is not None:
            if host in self.exact:  # named by the operator: allowed as it is
                return host
            candidates = [literal]
        else:
            infos = await anyio.getaddrinfo(host, port, type=socket.SOCK_STREAM)
            candidates = [ipaddress.ip_address(info[4][0]) for info in infos]
            if not candidates:
                raise APIError(400, f"the image host '{host}' does not resolve", param)
        chosen = candidates[0]
        if not (self.allow_private_addresses or chosen.is_global) or chosen.is_multicast or chosen.is_unspecified:
            raise APIError(
                400,
                f"the image host '{host}' resolves to {chosen}, a non-public address; images are fetched from "
                "public addresses only (see --allow-private-image-addresses)",
                param,
            )
        return str(chosen)

    async def _get(self, client: httpx.AsyncClient, url: httpx.URL, host: str, param: str) -> tuple[bytes, str | None]:
        """One hop: (body, None), or (b"", the Location) for a redirect. The connection goes to the
        address checked by `address` (no second lookup), with the host name in Host and TLS SNI."""
        size = f"{self.max_bytes >> 20} MiB" if self.max_bytes % (1 << 20) == 0 else f"{self.max_bytes} bytes"
        too_big = f"the image is larger than {size}"
        port = url.port or (443 if url.scheme == "https" else 80)
        ip = await self.address(host.lower(), port, param)
        headers = {"Accept": "image/*", "Accept-Encoding": "identity", "Host": url.netloc.decode("ascii")}
        extensions = {"sni_hostname": host} if url.scheme == "https" else {}
        async with client.stream("GET", url.copy_with(host=ip), headers=headers, extensions=extensions) as response:
            if response.is_redirect:
                return b"", response.headers["location"]
            if response.status_code != 200:
                raise APIError(400, f"fetching the image from '{host}' failed: HTTP {response.status_code}", param)
            length = response.headers.get("content-length", "")
            if length.isdigit() and int(length) > self.max_bytes:
                raise APIError(400, too_big, param)
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_bytes:
                    raise APIError(400, too_big, param)
            return bytes(body), None


class VisionPrompts:
    """A vision-language model's processor: placeholder expansion and pixel values for chat prompts."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(folder), local_files_only=True)
        if not hasattr(processor, "image_processor") or not getattr(processor, "image_token", None):
            raise RuntimeError(f"{folder} has no image processor config: the model cannot take images")
        self.processor = processor
        self.image_token: str = processor.image_token
        self.chat_template: str | None = getattr(processor, "chat_template", None)

    @classmethod
    def for_tokenizer(cls, tokenizer: Any) -> VisionPrompts | None:
        """The processor of the model folder the tokenizer came from, when that model takes images."""
        name = getattr(tokenizer, "name_or_path", "")
        if not name:
            return None
        folder = Path(name)
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
        return cls(folder) if isinstance(config, dict) and "vision_config" in config else None

    def encode(self, text: str, images: list[Image.Image], param: str) -> tuple[list[int], list[ImageInput]]:
        """Rendered chat text with one placeholder per image -> token ids with each placeholder
        expanded to the image's tokens, and the images' pixel values."""
        found = text.count(self.image_token)
        if found != len(images):
            raise APIError(
                400,
                f"the rendered prompt holds {found} image placeholders `{self.image_token}` for {len(images)} image(s) "
                "(the text may not contain the placeholder itself)",
                param,
            )
        if not images:
            return self.processor.tokenizer.encode(text, add_special_tokens=False), []
        out = self.processor(text=[text], images=images, return_tensors="pt", add_special_tokens=False)
        return out["input_ids"][0].tolist(), [image_input(p) for p in out["pixel_values"]]


def image_input(pixels: Any) -> ImageInput:
    """An image processor's pixel values [C, H, W] (a tensor) as the bytes a request carries."""
    import torch

    dtype = str(pixels.dtype).removeprefix("torch.")
    if dtype not in PIXEL_DTYPES:
        raise ValueError(f"pixel values must be one of {sorted(PIXEL_DTYPES)}, not {dtype}")
    flat = pixels.detach().cpu().contiguous().view(-1).view(torch.uint8)
    return ImageInput(flat.numpy().tobytes(), list(pixels.shape), dtype)
