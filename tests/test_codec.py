"""Wire image decoding and its limits."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from protos import reward_pb2
from services.core.codec import (
    ImageError,
    ImageLimits,
    as_hwc_uint8,
    decode_image,
    encode_file_bytes,
    encode_raw,
    to_chw_tensor,
)

LIMITS = ImageLimits(max_pixels=64 * 64, max_side=128)


def png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def png_bomb(width: int, height: int) -> bytes:
    """A valid, tiny PNG whose header declares a huge all-zero RGB canvas."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    compressor = zlib.compressobj(9)
    rows = b"\x00" * (1 + 3 * width) * 64
    data = b"".join(compressor.compress(rows) for _ in range(height // 64)) + compressor.flush()
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def test_raw_roundtrip_is_lossless() -> None:
    array = np.random.default_rng(0).integers(0, 256, size=(5, 7, 3), dtype=np.uint8)
    decoded = decode_image(encode_raw(array), LIMITS)
    assert np.array_equal(decoded, array)
    tensor = to_chw_tensor(decoded)
    assert tensor.shape == (3, 5, 7) and torch.equal(tensor.permute(1, 2, 0), torch.from_numpy(array))


def test_png_and_jpeg_decode() -> None:
    array = np.random.default_rng(1).integers(0, 256, size=(6, 4, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(encode_file_bytes(png_bytes(array)), LIMITS), array)
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=95)
    jpeg = decode_image(encode_file_bytes(buffer.getvalue()), LIMITS)
    assert jpeg.shape == (6, 4, 3) and jpeg.dtype == np.uint8


@pytest.mark.parametrize(
    ("image", "message"),
    [
        (reward_pb2.Image(height=2, width=2, data=b"\x00" * 11), "expected height·width·3 = 2·2·3 = 12"),
        (reward_pb2.Image(height=0, width=2, data=b""), "must be positive"),
        (reward_pb2.Image(height=65, width=65, data=b"\x00" * (65 * 65 * 3)), "limit is 4096"),
        (reward_pb2.Image(height=1, width=200, data=b"\x00" * 600), "max side 128"),
        (reward_pb2.Image(encoding=reward_pb2.IMAGE_ENCODING_PNG, data=b""), "no data"),
        (
            reward_pb2.Image(encoding=reward_pb2.IMAGE_ENCODING_PNG, data=b"\x89PNG\r\n\x1a\nnot really"),
            "cannot decode",
        ),
        (
            reward_pb2.Image(encoding=reward_pb2.IMAGE_ENCODING_JPEG, data=b"\xff\xd8\xff garbage"),
            "cannot decode",
        ),
        (reward_pb2.Image(encoding=7, data=b"x"), "unknown image encoding"),
    ],
)
def test_bad_images_raise_clear_errors(image: reward_pb2.Image, message: str) -> None:
    with pytest.raises(ImageError, match=message):
        decode_image(image, LIMITS)


def test_png_bomb_is_refused_before_decompression() -> None:
    bomb = png_bomb(12800, 12800)  # 490 MB of pixels in a file of well under 1 MB
    assert len(bomb) < 1_000_000
    with pytest.raises(ImageError, match="side over the limit"):
        decode_image(encode_file_bytes(bomb), LIMITS)
    with pytest.raises(ImageError, match="pixels"):
        decode_image(encode_file_bytes(bomb), ImageLimits(max_pixels=1_000_000, max_side=20_000))
    with pytest.raises(ImageError, match="decompression bomb"):  # Pillow's own guard, kept as a backstop
        decode_image(encode_file_bytes(png_bomb(19200, 19200)), ImageLimits(max_pixels=10**9, max_side=10**5))


def test_declared_size_must_match_encoded_size() -> None:
    image = encode_file_bytes(png_bytes(np.zeros((4, 4, 3), np.uint8)))
    image.height, image.width = 5, 4
    with pytest.raises(ImageError, match="declares 5x4"):
        decode_image(image, LIMITS)


def test_float_images_are_quantised_like_the_reward_models() -> None:
    x = torch.tensor([0.0, 0.5, 1.0, 1.2, -0.1, 0.0019, 0.002]).reshape(1, 1, 7).expand(3, 1, 7)
    got = as_hwc_uint8(x)
    # round(x·255) clamped: 0.5·255 = 127.5 rounds half-to-even to 128; 0.002·255 = 0.51 → 1
    assert got.shape == (1, 7, 3)
    assert got[0, :, 0].tolist() == [0, 128, 255, 255, 0, 0, 1]
    assert np.array_equal(as_hwc_uint8(np.full((2, 2, 3), 0.25)), np.full((2, 2, 3), 64, np.uint8))
