"""Image encoding on the wire, with the limits that keep a shared server safe.

Raw uint8 HWC RGB is the primary encoding: lossless and free to decode. PNG and JPEG are accepted for
humans and other tools; their declared size is checked *before* decompression so that a small file
claiming a huge canvas (a decompression bomb) is refused without allocating it.
"""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image as PILImage

from protos import reward_pb2
from services.core.wire import WireImage

RAW = reward_pb2.IMAGE_ENCODING_RAW_RGB8
PNG = reward_pb2.IMAGE_ENCODING_PNG
JPEG = reward_pb2.IMAGE_ENCODING_JPEG
_PIL_FORMAT = {PNG: "PNG", JPEG: "JPEG"}


class ImageError(ValueError):
    """An image on the wire is malformed or over a limit; the message says which and why."""


@dataclass(frozen=True, kw_only=True)
class ImageLimits:
    """Per-image limits enforced before any pixel is allocated."""

    max_pixels: int = 4096 * 4096
    """Largest accepted height·width (16.8 MP: ample for 512²–1024² generations)."""
    max_side: int = 16384
    """Largest accepted height or width."""

    def __post_init__(self) -> None:
        if self.max_pixels < 1 or self.max_side < 1:
            raise ValueError(
                f"max_pixels and max_side must be >= 1, got {self.max_pixels} and {self.max_side}"
            )


Reserve = Callable[[int], None]
"""Called with an image's pixel count once its size is known and before its pixels are allocated; it
raises to refuse the image (e.g. when a request's or the server's decoded-pixel budget is spent)."""


def decode_image(
    image: reward_pb2.Image | WireImage, limits: ImageLimits, *, reserve: Reserve | None = None
) -> np.ndarray:
    """Decode one wire image into an (H, W, 3) uint8 array, or raise ImageError."""
    if image.encoding == RAW:
        return _decode_raw(image, limits, reserve)
    if image.encoding in _PIL_FORMAT:
        return _decode_compressed(image, limits, reserve)
    raise ImageError(f"unknown image encoding {image.encoding}; expected RAW_RGB8, PNG or JPEG")


def _check_size(height: int, width: int, limits: ImageLimits) -> None:
    if height <= 0 or width <= 0:
        raise ImageError(f"image size must be positive, got height={height} width={width}")
    if height > limits.max_side or width > limits.max_side:
        raise ImageError(f"image side over the limit: {height}x{width}, max side {limits.max_side}")
    if height * width > limits.max_pixels:
        raise ImageError(
            f"image has {height * width} pixels ({height}x{width}), limit is {limits.max_pixels}"
        )


def _decode_raw(
    image: reward_pb2.Image | WireImage, limits: ImageLimits, reserve: Reserve | None
) -> np.ndarray:
    height, width = image.height, image.width
    _check_size(height, width, limits)
    expected = height * width * 3
    if len(image.data) != expected:
        raise ImageError(
            f"raw RGB8 image has {len(image.data)} bytes, "
            f"expected height·width·3 = {height}·{width}·3 = {expected}"
        )
    if reserve is not None:
        reserve(height * width)
    return np.frombuffer(image.data, dtype=np.uint8).reshape(height, width, 3)


def _decode_compressed(
    image: reward_pb2.Image | WireImage, limits: ImageLimits, reserve: Reserve | None
) -> np.ndarray:
    fmt = _PIL_FORMAT[image.encoding]
    if not image.data:
        raise ImageError(f"{fmt} image has no data")
    try:
        with warnings.catch_warnings():
            # Pillow's own bomb check only warns below 2x its limit; ours is explicit and stricter.
            warnings.simplefilter("ignore", PILImage.DecompressionBombWarning)
            pil = PILImage.open(io.BytesIO(image.data), formats=[fmt])
            width, height = pil.size
            _check_size(height, width, limits)
            if image.height and image.width and (image.height, image.width) != (height, width):
                raise ImageError(
                    f"{fmt} image is {height}x{width} but the request declares {image.height}x{image.width}"
                )
            if reserve is not None:
                reserve(height * width)
            pil.load()
            array = _to_rgb8(pil, fmt)
    except ImageError:
        raise
    except PILImage.DecompressionBombError as exc:
        raise ImageError(f"{fmt} image refused as a decompression bomb: {exc}") from None
    except PILImage.UnidentifiedImageError:
        raise ImageError(f"cannot decode {fmt} image: the data is not a {fmt} file") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"cannot decode {fmt} image: {_without_addresses(str(exc))}") from None
    return array


_CONVERTED_EXACTLY = frozenset({"RGB", "RGBA", "L", "LA", "1", "P", "PA"})
"""Modes whose RGB is exact: grey replicated, 1-bit as 0/255, palette looked up; alpha is dropped (the
stored colour is scored), as the reward models' reference loaders (``Image.convert("RGB")``) do."""
_SIXTEEN_BIT_GREY = frozenset({"I;16", "I;16B", "I;16L", "I;16N", "I"})


def _to_rgb8(pil: PILImage.Image, fmt: str) -> np.ndarray:
    """A loaded image as (H, W, 3) uint8, exactly, or ImageError naming a mode with no exact RGB.

    16-bit grey is scaled, v·255/65535 rounded (``convert("RGB")`` would clip it: a near-black 16-bit
    image scored as white). 16-bit RGB(A) PNGs reach here as 8-bit already: Pillow keeps each sample's
    high byte (⌊v/256⌋, at most 1 below the rounded scaling). EXIF orientation is not applied, as in
    the reference loaders: the pixels are scored as stored.
    """
    if pil.mode in _CONVERTED_EXACTLY:
        return np.asarray(pil.convert("RGB"), dtype=np.uint8)
    if pil.mode in _SIXTEEN_BIT_GREY:
        grey = np.asarray(pil, dtype=np.int64)
        if grey.min() < 0 or grey.max() > 65535:
            raise ImageError(f"{fmt} image of mode {pil.mode!r} holds values outside 16 bits")
        scaled = ((grey * 255 + 32767) // 65535).astype(np.uint8)  # round half up, in integers
        return np.repeat(scaled[..., None], 3, axis=2)
    raise ImageError(
        f"{fmt} image of mode {pil.mode!r} has no exact RGB (CMYK needs its ICC profile); send RGB"
    )


def _without_addresses(message: str) -> str:
    """A decoder's message without object reprs like ``<_io.BytesIO object at 0x7f…>``."""
    return re.sub(r"<[^<>]* at 0x[0-9a-fA-F]+>", "the data", message)


# Raw images are views of the request body, which is read-only to Python; torch warns once per process
# about wrapping such memory. Scorers only read their inputs (ScoreBatch.images), so it is not copied.
warnings.filterwarnings(
    "ignore", message="The given NumPy array is not writable", category=UserWarning, module=__name__
)


def to_chw_tensor(array: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 array → (3, H, W) uint8 tensor sharing its memory, read-only arrays included
    (copying a 512² image costs ~0.06 ms on the 2-core benchmark VM, a tenth of its whole transport)."""
    return torch.from_numpy(array).permute(2, 0, 1)


def encode_raw(array: np.ndarray) -> reward_pb2.Image:
    """(H, W, 3) uint8 array → raw wire image."""
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"expected an (H, W, 3) uint8 array, got shape {array.shape} dtype {array.dtype}")
    height, width, _ = array.shape
    return reward_pb2.Image(
        encoding=RAW, height=height, width=width, data=np.ascontiguousarray(array).tobytes()
    )


def encode_file_bytes(data: bytes) -> reward_pb2.Image:
    """PNG or JPEG file bytes → wire image (the server decodes and checks it)."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return reward_pb2.Image(encoding=PNG, data=data)
    if data.startswith(b"\xff\xd8"):
        return reward_pb2.Image(encoding=JPEG, data=data)
    raise ValueError("image file is neither PNG nor JPEG")


def as_hwc_uint8(image: np.ndarray | torch.Tensor) -> np.ndarray:
    """Accept (3, H, W) / (H, W, 3), uint8 or float in [0, 1]; return (H, W, 3) uint8.

    Floats are quantised with round(x·255).clamp(0, 255), as the reward models' reference code does.
    """
    if isinstance(image, torch.Tensor):
        if image.is_floating_point():
            image = (image.detach().float() * 255).round().clamp(0, 255).to(torch.uint8)
        image = image.detach().cpu().numpy()
    elif np.issubdtype(image.dtype, np.floating):
        image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"expected a 3-D uint8 or float image, got shape {image.shape} dtype {image.dtype}")
    if image.shape[0] == 3 and image.shape[2] != 3:
        image = np.transpose(image, (1, 2, 0))
    if image.shape[2] != 3:
        raise ValueError(f"expected 3 colour channels, got shape {image.shape}")
    return np.ascontiguousarray(image)
