"""The hand-written ScoreRequest writer and reader against the protobuf library's own serialisation and
parse."""

from __future__ import annotations

import numpy as np
import pytest
from google.protobuf.message import DecodeError

from protos import reward_pb2, reward_pb2_grpc
from services.core.wire import (
    SCORE_METHOD,
    SCORE_STREAM_METHOD,
    WireRequest,
    encode_sample,
    from_message,
    parse_request,
    serialize_request,
)


def _library_request(fields: list[tuple[np.ndarray, str, str, str]]) -> reward_pb2.ScoreRequest:
    samples = []
    for image, prompt, metadata_json, group_id in fields:
        height, width, _ = image.shape
        samples.append(
            reward_pb2.Sample(
                image=reward_pb2.Image(
                    encoding=reward_pb2.IMAGE_ENCODING_RAW_RGB8,
                    height=height,
                    width=width,
                    data=image.tobytes(),
                ),
                prompt=prompt,
                metadata_json=metadata_json,
                group_id=group_id,
            )
        )
    return reward_pb2.ScoreRequest(samples=samples)


def _fields(rng: np.random.Generator) -> list[tuple[np.ndarray, str, str, str]]:
    """Sizes whose varints take 1, 2 and 3 bytes, empty and non-ASCII strings, long metadata."""
    return [
        (rng.integers(0, 256, (1, 1, 3), dtype=np.uint8), "", "", ""),
        (rng.integers(0, 256, (7, 300, 3), dtype=np.uint8), "a red cube", "", "g0"),
        (rng.integers(0, 256, (512, 512, 3), dtype=np.uint8), "Ein Würfel — 立方体 🧊", "", ""),
        (
            rng.integers(0, 256, (33, 65, 3), dtype=np.uint8),
            "two circles",
            '{"tag": "counting", "include": [{"class": "circle", "count": 2}]}' + " " * 200,
            "prompt-17/noise-3",
        ),
    ]


def test_bytes_equal_the_protobuf_serialisation() -> None:
    fields = _fields(np.random.default_rng(0))
    ours = serialize_request([encode_sample(*f) for f in fields])
    assert ours == _library_request(fields).SerializeToString()


def test_every_sample_alone_and_sizes_add_up() -> None:
    fields = _fields(np.random.default_rng(1))
    encoded = [encode_sample(*f) for f in fields]
    for f, sample in zip(fields, encoded, strict=True):
        single = _library_request([f])
        assert serialize_request([sample]) == single.SerializeToString()
        assert sample.size == single.ByteSize()
    assert sum(s.size for s in encoded) == _library_request(fields).ByteSize()


def test_parsed_back_by_the_library() -> None:
    image = np.random.default_rng(2).integers(0, 256, (40, 24, 3), dtype=np.uint8)
    parsed = reward_pb2.ScoreRequest.FromString(
        serialize_request(
            [encode_sample(image, "p", '{"a": 1}', "g"), encode_sample(image[::-1].copy(), "q")]
        )
    )
    first, second = parsed.samples
    assert (first.image.height, first.image.width) == (40, 24)
    assert np.array_equal(np.frombuffer(first.image.data, np.uint8).reshape(40, 24, 3), image)
    assert np.array_equal(np.frombuffer(second.image.data, np.uint8).reshape(40, 24, 3), image[::-1])
    assert (first.prompt, first.metadata_json, first.group_id) == ("p", '{"a": 1}', "g")
    assert (second.prompt, second.metadata_json, second.group_id) == ("q", "", "")
    assert serialize_request([]) == reward_pb2.ScoreRequest().SerializeToString() == b""


def test_refuses_arrays_it_cannot_send_without_copying() -> None:
    image = np.zeros((8, 8, 3), dtype=np.uint8)
    with pytest.raises(ValueError, match="C-contiguous"):
        encode_sample(image[:, ::2], "p")
    with pytest.raises(ValueError, match="uint8"):
        encode_sample(image.astype(np.float32), "p")
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        encode_sample(np.zeros((8, 8, 4), dtype=np.uint8), "p")


def test_method_paths_are_the_generated_stubs() -> None:
    paths: dict[str, list[str]] = {"unary_unary": [], "stream_unary": []}

    class RecordingChannel:
        def unary_unary(self, path: str, *args: object, **kwargs: object) -> None:
            paths["unary_unary"].append(path)

        def stream_unary(self, path: str, *args: object, **kwargs: object) -> None:
            paths["stream_unary"].append(path)

    reward_pb2_grpc.RewardServiceStub(RecordingChannel())
    assert SCORE_METHOD in paths["unary_unary"] and SCORE_METHOD.endswith("/Score")
    assert paths["stream_unary"] == [SCORE_STREAM_METHOD] and SCORE_STREAM_METHOD.endswith("/ScoreStream")


# -- reading ---------------------------------------------------------------------------------------


def _plain(request: WireRequest) -> list[tuple]:
    """A WireRequest as plain values (image bytes as bytes), to compare two parses."""
    return [
        (
            None
            if s.image is None
            else (s.image.encoding, s.image.height, s.image.width, bytes(s.image.data)),
            s.prompt,
            s.metadata_json,
            s.group_id,
        )
        for s in request.samples
    ]


def _library_parse(body: bytes) -> list[tuple] | type[DecodeError]:
    try:
        return _plain(from_message(reward_pb2.ScoreRequest.FromString(body)))
    except DecodeError:
        return DecodeError


def _our_parse(body: bytes) -> list[tuple] | type[DecodeError]:
    try:
        return _plain(parse_request(body))
    except DecodeError:
        return DecodeError


def test_reads_what_the_library_reads_and_keeps_pixels_in_the_body() -> None:
    fields = _fields(np.random.default_rng(3))
    body = _library_request(fields).SerializeToString()
    request = parse_request(body)
    assert _plain(request) == _library_parse(body)
    assert [s.image.data.tobytes() for s in request.samples] == [f[0].tobytes() for f in fields]
    # Zero copy: each image's data is a view into the very bytes object the server was handed.
    body_start = np.frombuffer(body, np.uint8).ctypes.data
    for sample in request.samples:
        address = np.frombuffer(sample.image.data, np.uint8).ctypes.data
        assert body_start <= address < body_start + len(body)
    assert parse_request(b"") == WireRequest(samples=())


def _key(field: int, wire_type: int) -> bytes:
    return bytes([field << 3 | wire_type])


def _len_field(field: int, data: bytes) -> bytes:
    assert len(data) < 128
    return _key(field, 2) + bytes([len(data)]) + data


def test_non_canonical_encodings_mean_what_they_mean_to_the_library() -> None:
    pixels = bytes(range(12))
    image = _key(1, 0) + b"\x00" + _key(2, 0) + b"\x02" + _key(3, 0) + b"\x02" + _len_field(4, pixels)
    unknown = (
        _key(9, 0) + b"\x96\x01" + _key(10, 1) + bytes(8) + _key(11, 5) + bytes(4) + _len_field(12, b"x")
    )
    cases = {
        "fields out of order": _len_field(1, _len_field(2, b"p") + _len_field(1, image)),
        "unknown fields everywhere": unknown
        + _len_field(1, unknown + _len_field(1, unknown + image) + _len_field(2, b"p")),
        # protobuf merges a repeated sub-message and lets the last scalar win: the reader defers to it
        "image split in two": _len_field(1, _len_field(1, image[:6]) + _len_field(1, image[6:])),
        "prompt twice": _len_field(1, _len_field(1, image) + _len_field(2, b"a") + _len_field(2, b"b")),
        "height twice": _len_field(1, _len_field(1, image + _key(2, 0) + b"\x01")),
        "negative encoding": _len_field(1, _len_field(1, _key(1, 0) + b"\xff" * 9 + b"\x01")),
        "height over 32 bits": _len_field(1, _len_field(1, _key(2, 0) + b"\x80" * 5 + b"\x01")),
        "sample as a varint": _key(1, 0) + b"\x05",
        "a group": _key(1, 3) + _key(1, 4),
        "bad UTF-8 prompt": _len_field(1, _len_field(2, b"\xff\xfe")),
        "truncated": _len_field(1, _len_field(1, image))[:-3],
        "field number 0": b"\x00\x00",
    }
    outcomes = {name: _library_parse(body) for name, body in cases.items()}
    merged_image = outcomes["image split in two"][0][0]
    assert merged_image == outcomes["fields out of order"][0][0] == (0, 2, 2, pixels)  # as protobuf merges
    assert outcomes["prompt twice"][0][1] == "b"
    assert outcomes["bad UTF-8 prompt"] is DecodeError and outcomes["truncated"] is DecodeError
    for name, body in cases.items():
        assert _our_parse(body) == outcomes[name], name


def test_mutated_bodies_parse_exactly_as_the_library_parses_them() -> None:
    """Random byte flips, truncations and insertions of a real request: the same samples or the
    same DecodeError as protobuf, every time."""
    rng = np.random.default_rng(4)
    fields = [
        (rng.integers(0, 256, (2, 3, 3), dtype=np.uint8), "a cube", '{"tag": "x"}', "g"),
        (rng.integers(0, 256, (1, 2, 3), dtype=np.uint8), "Würfel", "", ""),
    ]
    body = _library_request(fields).SerializeToString()
    errors = 0
    for _ in range(3000):
        mutated = bytearray(body)
        for _ in range(int(rng.integers(1, 4))):
            kind, at = int(rng.integers(0, 3)), int(rng.integers(0, len(mutated)))
            if kind == 0:
                mutated[at] = int(rng.integers(0, 256))
            elif kind == 1:
                del mutated[at:]
            else:
                mutated[at:at] = bytes([int(rng.integers(0, 256))])
            if not mutated:
                break
        expected = _library_parse(bytes(mutated))
        errors += expected is DecodeError
        assert _our_parse(bytes(mutated)) == expected, bytes(mutated).hex()
    assert 100 < errors < 2900  # both outcomes were exercised
