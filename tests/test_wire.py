"""The client's hand-written ScoreRequest bytes against the protobuf library's own serialisation."""

from __future__ import annotations

import numpy as np
import pytest

from protos import reward_pb2, reward_pb2_grpc
from services.core.wire import SCORE_METHOD, encode_sample, serialize_request


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


def test_method_path_is_the_generated_stubs() -> None:
    paths: list[str] = []

    class RecordingChannel:
        def unary_unary(self, path: str, *args: object, **kwargs: object) -> None:
            paths.append(path)

    reward_pb2_grpc.RewardServiceStub(RecordingChannel())
    assert SCORE_METHOD in paths and SCORE_METHOD.endswith("/Score")
