"""Images in chat requests: OpenAI `image_url` content parts, fetched and bounded.

A served vision-language model takes a message's content as OpenAI's parts,
`[{"type": "text", "text": ...}, {"type": "image_url", "image_url": {"url": ...}}]`. Each image
part becomes the model's image token in the prompt text (where the picture was, as training put
it) and its picture is fetched here. Two kinds of URL are taken:

- `data:image/...;base64,...`, decoded in memory (the request body is already bounded by
  `--max-request-bytes`);
- `s3://bucket/key`, through the storage layer (its endpoint and credentials, its cache), after
  a HEAD says the object is no larger than the bound.

Anything else (http(s), file paths) is refused: a server that fetched arbitrary URLs or read its
own disk for a client would be a way into the cluster's network and files. Each image is also
bounded in bytes (`MAX_IMAGE_BYTES`) and must decode as a picture.
"""

from __future__ import annotations

import base64
import binascii
import io
from typing import Any

from kubetune.trainer.api.spec import StorageSpec
from kubetune.trainer.serve.params import InvalidRequest

MAX_IMAGE_BYTES = 20 * 1024 * 1024
"""The largest image a request may carry or point at (as OpenAI's API)."""
MAX_IMAGES = 8
"""Images per request, unless the server's `--max-images` says otherwise."""


def image_urls(content: Any) -> list[str]:
    """The URLs of a message content's `image_url` parts, in order."""
    if not isinstance(content, list):
        return []
    urls = []
    for part in content:
        if isinstance(part, dict) and part.get("type") == "image_url":
            ref = part.get("image_url")
            url = ref.get("url") if isinstance(ref, dict) else ref
            if not isinstance(url, str) or not url:
                raise InvalidRequest("messages", "an image_url part has no url.", 'send {"type": "image_url", "image_url": {"url": ...}}.')
            urls.append(url)
    return urls


def fetch_image(url: str, storage: StorageSpec | None = None, max_bytes: int = MAX_IMAGE_BYTES) -> Any:
    """The picture at `url` (a data: URL or an s3:// URI) as an RGB PIL image."""
    if url.startswith("data:"):
        data = _decode_data_url(url, max_bytes)
    elif url.startswith("s3://"):
        data = _read_s3(url, storage or StorageSpec(), max_bytes)
    else:
        raise InvalidRequest("messages", f"image URL {url[:60]!r} is neither a data: URL nor an s3:// URI.",
                             "send the image inline (data:image/png;base64,...) or from the model's S3 storage.")
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (UnidentifiedImageError, OSError, ValueError):
        raise InvalidRequest("messages", f"image {url[:60]!r} is not a picture PIL can read.", "send a PNG, JPEG or WebP image.") from None


def fetch_images(urls: list[str], storage: StorageSpec | None = None, max_bytes: int = MAX_IMAGE_BYTES, *,
                 max_images: int = MAX_IMAGES) -> list[Any]:
    if len(urls) > max_images:
        raise InvalidRequest("messages", f"{len(urls)} images in one request; this server takes at most {max_images}.",
                             "send fewer images (the server's --max-images).")
    return [fetch_image(url, storage, max_bytes) for url in urls]


def _decode_data_url(url: str, max_bytes: int) -> bytes:
    header, _, payload = url.partition(",")
    if not header.endswith(";base64") or not header[5:].startswith("image/"):
        raise InvalidRequest("messages", "a data: image URL must be data:image/<type>;base64,<data>.")
    if len(payload) > (max_bytes * 4) // 3 + 4:
        raise InvalidRequest("messages", f"an inline image is over {max_bytes // 2**20} MiB.", "send a smaller image.")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("messages", "an inline image is not valid base64.") from None


def _read_s3(url: str, storage: StorageSpec, max_bytes: int) -> bytes:
    """The object's bytes through the storage layer, after a HEAD bounds its size."""
    from kubetune.trainer.api.uri import S3Uri
    from kubetune.trainer.artifacts import localize
    from kubetune.trainer.artifacts.client import get_client, translate

    uri = S3Uri.parse(url, "messages")
    try:
        size = int(get_client(storage).head_object(Bucket=uri.bucket, Key=uri.key)["ContentLength"])
    except Exception as exc:  # botocore's errors (not found, denied, unreachable) as kubetune's
        raise translate(exc, url, field="messages", action="read") from None
    if size > max_bytes:
        raise InvalidRequest("messages", f"image {url} is {size / 2**20:.1f} MiB, over {max_bytes // 2**20} MiB.", "send a smaller image.")
    return localize(url, storage, field="messages").read_bytes()
