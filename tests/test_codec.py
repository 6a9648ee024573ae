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


# -- every mode a PNG or JPEG can decode to ------------------------------------------------------------


def png16(samples: np.ndarray, color_type: int) -> bytes:
    """A 16-bit PNG written by hand (Pillow writes 16-bit grey only): (H, W, C) uint16 samples, C = 1
    (colour type 0, grey), 2 (4, grey+alpha), 3 (2, RGB) or 4 (6, RGBA)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body) & 0xFFFFFFFF)

    height, width, _ = samples.shape
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in samples)
    header = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _decoded(data: bytes) -> np.ndarray:
    return decode_image(encode_file_bytes(data), LIMITS)


def _saved(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def test_every_png_mode_decodes_to_its_exact_rgb() -> None:
    rng = np.random.default_rng(7)
    rgba = rng.integers(0, 256, (5, 6, 4), dtype=np.uint8)
    grey = rgba[..., 0]
    cases = {
        "RGB": (Image.fromarray(rgba[..., :3]), rgba[..., :3]),
        "RGBA (alpha dropped)": (Image.fromarray(rgba, "RGBA"), rgba[..., :3]),
        "L": (Image.fromarray(grey), np.repeat(grey[..., None], 3, 2)),
        "LA (alpha dropped)": (Image.fromarray(rgba[..., :2], "LA"), np.repeat(rgba[..., :1], 3, 2)),
        "1": (Image.fromarray(grey > 127), np.repeat(np.where(grey > 127, 255, 0)[..., None], 3, 2)),
    }
    palette = rng.integers(0, 256, (16, 3), dtype=np.uint8)
    indices = rng.integers(0, 16, (5, 6), dtype=np.uint8)
    paletted = Image.fromarray(indices, "P")
    paletted.putpalette(palette.tobytes())
    cases["P"] = (paletted, palette[indices])
    transparent = paletted.copy()
    transparent.info["transparency"] = 3
    cases["P with transparency (alpha dropped)"] = (transparent, palette[indices])
    for name, (image, expected) in cases.items():
        data = _saved(image, "PNG")
        assert Image.open(io.BytesIO(data)).mode == name.split()[0], name
        np.testing.assert_array_equal(_decoded(data), expected, err_msg=name)


def test_sixteen_bit_pngs_are_scaled_not_clipped() -> None:
    rng = np.random.default_rng(8)
    samples = rng.integers(0, 65536, (4, 5, 4), dtype=np.uint16)
    samples[0, :3, 0] = [0, 300, 65535]  # near black must stay near black (convert("RGB") made it 255)
    grey_image = _decoded(_saved(Image.fromarray(samples[..., 0]), "PNG"))  # Pillow writes 16-bit grey
    expected_grey = np.round(samples[..., 0] / 257).astype(np.uint8)  # v·255/65535
    np.testing.assert_array_equal(grey_image, np.repeat(expected_grey[..., None], 3, 2))
    assert grey_image[0, :3, 0].tolist() == [0, 1, 255]
    np.testing.assert_array_equal(_decoded(png16(samples[..., :1], 0)), grey_image)
    # Grey+alpha, RGB and RGBA reach the codec as 8-bit: Pillow keeps each sample's high byte.
    high = (samples >> 8).astype(np.uint8)
    np.testing.assert_array_equal(_decoded(png16(samples[..., :2], 4)), np.repeat(high[..., :1], 3, 2))
    np.testing.assert_array_equal(_decoded(png16(samples[..., :3], 2)), high[..., :3])
    np.testing.assert_array_equal(_decoded(png16(samples, 6)), high[..., :3])


def test_jpeg_modes_are_converted_or_refused_by_name() -> None:
    grey = np.random.default_rng(9).integers(0, 256, (8, 8), dtype=np.uint8)
    data = _saved(Image.fromarray(grey), "JPEG")
    expected = np.asarray(Image.open(io.BytesIO(data)))  # the JPEG's own decoded grey
    np.testing.assert_array_equal(_decoded(data), np.repeat(expected[..., None], 3, 2))
    cmyk = _saved(Image.new("CMYK", (4, 4), (10, 20, 30, 40)), "JPEG")
    with pytest.raises(ImageError, match="mode 'CMYK' has no exact RGB"):
        _decoded(cmyk)


def test_exif_orientation_is_not_applied() -> None:
    array = np.zeros((4, 8, 3), np.uint8)
    array[:, :4] = 255  # left half white
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", exif=exif, quality=100)
    decoded = _decoded(buffer.getvalue())
    assert decoded.shape == (4, 8, 3)  # as stored, not rotated to 8x4
    assert decoded[:, :3].min() > 200 and decoded[:, 5:].max() < 50


def test_decoder_errors_name_no_object_address() -> None:
    for data in (b"\x89PNG\r\n\x1a\n" + b"garbage" * 10, b"\xff\xd8" + b"\x00" * 50):
        with pytest.raises(ImageError) as info:
            _decoded(data)
        assert " at 0x" not in str(info.value) and "object" not in str(info.value), str(info.value)
