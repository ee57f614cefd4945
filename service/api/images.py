"""Image inputs of chat requests: inline `data:` URLs decoded with Pillow under deliberate limits,
then preprocessed by the checkpoint's own transformers processor, so that the pixel values and
the number of image tokens are exactly what transformers would compute.

Every refusal is a 400 whose `param` points at the offending content part.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import warnings
from pathlib import Path
from typing import Any

from PIL import Image

from freelunch.api.errors import APIError
from freelunch.engine.request import ImageInput

MAX_IMAGES_PER_REQUEST = 8
MAX_IMAGE_BYTES = 6 << 20  # decoded; the request body limit bounds it too
MAX_IMAGE_PIXELS = 4096 * 4096
# Pillow decoders tried, and the MIME types a data URL may declare (image/jpg: a common misspelling)
FORMATS = ("PNG", "JPEG", "WEBP", "GIF")
MIME_TYPES = ("image/png", "image/jpeg", "image/jpg", "image/webp", "image/gif")

# Set deliberately: Pillow's own decompression-bomb limit, which `decode_image` enforces strictly.
Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS


def decode_image(url: str, param: str) -> Image.Image:
    """A `data:image/...;base64,...` URL -> an RGB image; APIError(400, param) for anything else."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise APIError(400, "fetching images from URLs is not supported: send the image inline as a data: URL (base64)", param)
    if scheme != "data":
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
    try:
        with warnings.catch_warnings():
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


class VisionPrompts:
    """A vision-language model's processor: placeholder expansion and pixel values for chat prompts."""

    def __init__(self, folder: Path) -> None:
        from transformers import AutoProcessor

        processor = AutoProcessor.from_pretrained(str(folder))
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
        return out["input_ids"][0].tolist(), [ImageInput.from_tensor(p) for p in out["pixel_values"]]
