"""ScoreRequest bytes written straight from pixel arrays (the client's hot path) and read back into views
of the request body (the server's).

Building the request from protobuf messages copies every image five times (``tobytes``, ``Image``,
``Sample``, ``ScoreRequest``, ``SerializeToString``): 0.86 ms per 512² image on the 2-core benchmark VM,
0.07 ms written here, where each image is copied once, by the final ``bytes.join`` (docs/benchmarks.md
§2). The output is canonical proto3 (fields in number order, default values omitted), byte-for-byte what
``ScoreRequest.SerializeToString()`` gives for the same fields, so every protobuf parser reads it; the
tests check that against the protobuf library.

Reading: the protobuf library's parse copies every image's bytes, and each read of ``image.data`` copies
them again. :func:`parse_request` walks canonical requests itself and hands out each image's pixels as a
view of the body gRPC gave the deserializer: the server's decode of a 512² image went from 0.21 to
0.013 ms, image checks and tensor view included. Anything it does not fully understand (a field repeated
that protobuf would merge, a group, an out-of-range varint, bad UTF-8, truncation) goes to the protobuf
library instead, whose result or ``DecodeError`` is authoritative; tests compare both on mutated bodies.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from protos import reward_pb2

_LEN = 2  # wire type of length-delimited fields (bytes, strings, sub-messages)
_VARINT = 0


def _method_path(name: str) -> str:
    service = reward_pb2.DESCRIPTOR.services_by_name["RewardService"]
    return "/{}/{}".format(*service.methods_by_name[name].full_name.rsplit(".", 1))


SCORE_METHOD = _method_path("Score")
"""The Score RPC's path, for a channel call that sends these bytes as they are."""
SCORE_STREAM_METHOD = _method_path("ScoreStream")
"""The ScoreStream RPC's path: the same bytes, cut at sample boundaries into a stream of messages."""


def varint(value: int) -> bytes:
    """``value`` (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _key(field: int, wire_type: int) -> bytes:
    return varint(field << 3 | wire_type)


def _uint_field(field: int, value: int) -> bytes:
    return _key(field, _VARINT) + varint(value) if value else b""


def _text_field(field: int, text: str) -> bytes:
    data = text.encode("utf-8")
    return _key(field, _LEN) + varint(len(data)) + data if data else b""


@dataclass(frozen=True, slots=True)
class EncodedSample:
    """One ``Sample`` as a field of ``ScoreRequest``: header bytes, the pixels (not copied), the rest."""

    head: bytes
    pixels: memoryview
    tail: bytes
    group_id: str

    @property
    def size(self) -> int:
        """Bytes this sample adds to a request."""
        return len(self.head) + len(self.pixels) + len(self.tail)


def encode_sample(
    image: np.ndarray, prompt: str, metadata_json: str = "", group_id: str = ""
) -> EncodedSample:
    """An (H, W, 3) uint8 C-contiguous image and its fields as a raw-RGB8 ``Sample`` of a ScoreRequest."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or not image.flags.c_contiguous:
        raise ValueError(
            f"expected a C-contiguous (H, W, 3) uint8 array, got shape {image.shape} dtype {image.dtype}"
        )
    height, width, _ = image.shape
    pixels = memoryview(image).cast("B")
    # Image: encoding RAW_RGB8 is 0, proto3's default, so it is not written.
    image_head = (
        _uint_field(1, reward_pb2.IMAGE_ENCODING_RAW_RGB8)
        + _uint_field(2, height)
        + _uint_field(3, width)
        + (_key(4, _LEN) + varint(len(pixels)) if len(pixels) else b"")
    )
    image_size = len(image_head) + len(pixels)
    tail = _text_field(2, prompt) + _text_field(3, metadata_json) + _text_field(4, group_id)
    sample_head = _key(1, _LEN) + varint(image_size)
    sample_size = len(sample_head) + image_size + len(tail)
    head = _key(1, _LEN) + varint(sample_size) + sample_head + image_head
    return EncodedSample(head=head, pixels=pixels, tail=tail, group_id=group_id)


def serialize_request(samples: Sequence[EncodedSample]) -> bytes:
    """The ``ScoreRequest`` holding these samples, in order."""
    return b"".join(part for s in samples for part in (s.head, s.pixels, s.tail))


def serialize_parts(samples: Sequence[EncodedSample], max_part_bytes: int | None) -> list[bytes]:
    """The ``ScoreRequest`` holding these samples as consecutive messages of at most ``max_part_bytes``
    each (a larger sample alone in its message), for ScoreStream; None: one message.

    Concatenated, the parts are byte-for-byte :func:`serialize_request` of all the samples: a repeated
    field's entries in consecutive messages append, so the stream means the same request.
    """
    if max_part_bytes is None:
        return [serialize_request(samples)]
    parts: list[bytes] = []
    start = size = 0
    for end, sample in enumerate(samples):
        if end > start and size + sample.size > max_part_bytes:
            parts.append(serialize_request(samples[start:end]))
            start, size = end, 0
        size += sample.size
    parts.append(serialize_request(samples[start:]))
    return parts


# -- reading ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WireImage:
    """``Image`` as read off the wire; ``data`` may be a view of the request body (not a copy)."""

    encoding: int = reward_pb2.IMAGE_ENCODING_RAW_RGB8
    height: int = 0
    width: int = 0
    data: bytes | memoryview = b""


@dataclass(frozen=True, slots=True)
class WireSample:
    """``Sample``; ``image`` is None when the field is absent."""

    image: WireImage | None = None
    prompt: str = ""
    metadata_json: str = ""
    group_id: str = ""


@dataclass(frozen=True, slots=True)
class WireRequest:
    """``ScoreRequest``: its samples, in order."""

    samples: tuple[WireSample, ...] = ()


class _NotCanonical(Exception):
    """The fast reader met something it leaves to the protobuf library."""


class RequestTooLarge(ValueError):
    """The body holds more than :class:`ReadBounds` allows; reading stopped there."""


@dataclass(frozen=True, slots=True)
class ReadBounds:
    """What one body may hold, enforced *while* it is read, so that reading it costs the server a
    bounded number of steps whatever its size (a 64 MB body of empty samples or unknown fields would
    otherwise take seconds of event-loop time and gigabytes of objects before any limit is checked).

    Known fields need no count of their own: a sample holds at most 4 and its image 4 (one more of a
    kind is not canonical and goes to the counted path), so samples bound them. Pixels need no bound
    here either: raw images are views of the body (no allocation), and the decoder reserves every
    image's pixels against the request's and the server's budgets before allocating."""

    max_samples: int
    """More ``samples`` entries than this: refused at the first one over."""
    max_unknown_fields: int
    """Fields this server does not know (a newer client's), at every level together."""
    samples_before: int = 0
    """Samples of the same request already read (earlier parts of a stream): they count too."""

    @classmethod
    def for_samples(cls, max_samples: int, samples_before: int = 0) -> ReadBounds:
        """The sample limit, with room for :data:`UNKNOWN_FIELDS_PER_SAMPLE` unknown fields per sample
        still allowed and :data:`UNKNOWN_FIELDS_PER_BODY` more."""
        unknown = UNKNOWN_FIELDS_PER_BODY + UNKNOWN_FIELDS_PER_SAMPLE * (max_samples - samples_before)
        return cls(max_samples, unknown, samples_before)


UNKNOWN_FIELDS_PER_SAMPLE = 2
UNKNOWN_FIELDS_PER_BODY = 64
_FIXED_SIZE = {1: 8, 5: 4}  # wire types fixed64 and fixed32
_GROUP_START, _GROUP_END = 3, 4
_MAX_FIELD_NUMBER = (1 << 29) - 1


def parse_request(data: bytes, bounds: ReadBounds | None = None) -> WireRequest:
    """Serialized ScoreRequest → :class:`WireRequest`; raises ``google.protobuf.message.DecodeError``,
    or :class:`RequestTooLarge` as soon as the body is seen to exceed ``bounds`` (None: unbounded)."""
    buf = memoryview(data)
    try:
        request = _read_request(buf, _Steps(bounds))
    except _NotCanonical:
        if bounds is not None:
            _skim(buf, bounds)  # the library's parse is C, but building its samples is not: count first
        request = from_message(reward_pb2.ScoreRequest.FromString(data))
    return request


def from_message(request: reward_pb2.ScoreRequest) -> WireRequest:
    """A parsed protobuf ScoreRequest as a :class:`WireRequest` (image bytes copied once)."""
    return WireRequest(
        samples=tuple(
            WireSample(
                image=WireImage(
                    encoding=s.image.encoding, height=s.image.height, width=s.image.width, data=s.image.data
                )
                if s.HasField("image")
                else None,
                prompt=s.prompt,
                metadata_json=s.metadata_json,
                group_id=s.group_id,
            )
            for s in request.samples
        )
    )


class _Steps:
    """The unknown fields and samples a read may still take (unbounded when ``bounds`` is None)."""

    def __init__(self, bounds: ReadBounds | None) -> None:
        self.bounds = bounds
        self.unknown_left = bounds.max_unknown_fields if bounds else -1
        self.samples_left = bounds.max_samples - bounds.samples_before if bounds else -1

    def unknown(self) -> None:
        if self.unknown_left == 0:
            assert self.bounds is not None
            raise RequestTooLarge(
                f"request has more than {self.bounds.max_unknown_fields} protobuf fields this server "
                f"does not know ({UNKNOWN_FIELDS_PER_SAMPLE} per sample and {UNKNOWN_FIELDS_PER_BODY} "
                "per body allowed)"
            )
        self.unknown_left -= 1

    def sample(self) -> None:
        if self.samples_left == 0:
            assert self.bounds is not None
            raise RequestTooLarge(f"request has more than {self.bounds.max_samples} samples; split it")
        self.samples_left -= 1


def _read_varint(buf: memoryview, pos: int, max_bytes: int = 10) -> tuple[int, int]:
    value = shift = 0
    for i in range(pos, min(pos + max_bytes, len(buf))):
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, i + 1
        shift += 7
    raise _NotCanonical


def _walk(buf: memoryview, *, groups: bool) -> Iterator[tuple[int, int, int | memoryview | None]]:
    """(field number, wire type, value) of each field of one message level, as read: varints as ints,
    lengths as views, fixed-size fields and (with ``groups``) group markers as None. Bytes that are not a
    well-formed field raise _NotCanonical (a group without ``groups``, an invalid wire type or field
    number, a value running past the end)."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _read_varint(buf, pos, max_bytes=5)
        number, wire_type = key >> 3, key & 7
        if not 1 <= number <= _MAX_FIELD_NUMBER:
            raise _NotCanonical
        if wire_type == _VARINT:
            value, pos = _read_varint(buf, pos)
            yield number, wire_type, value
        elif wire_type == _LEN:
            length, pos = _read_varint(buf, pos)
            if pos + length > end:
                raise _NotCanonical
            yield number, wire_type, buf[pos : pos + length]
            pos += length
        elif wire_type in _FIXED_SIZE:
            pos += _FIXED_SIZE[wire_type]
            if pos > end:
                raise _NotCanonical
            yield number, wire_type, None
        elif groups and wire_type in (_GROUP_START, _GROUP_END):
            yield number, wire_type, None
        else:  # groups where the fast reader takes none, and the invalid wire types 6, 7
            raise _NotCanonical


def _fields(
    buf: memoryview, steps: _Steps, known: dict[int, int]
) -> Iterator[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message's varint and length fields; fixed-size unknown
    fields skipped. Fields not in ``known`` count against the bounds."""
    for number, wire_type, value in _walk(buf, groups=False):
        if number not in known:
            steps.unknown()
        if value is not None:
            yield number, wire_type, value


def _skim(buf: memoryview, bounds: ReadBounds) -> None:
    """Count a body's samples and other top-level fields (group contents included) against ``bounds`` without
    building anything, before the protobuf library parses it. Malformed bytes end the count: the
    library's parse then raises its DecodeError."""
    steps, depth = _Steps(bounds), 0
    try:
        for number, wire_type, _ in _walk(buf, groups=True):
            if number == 1 and wire_type == _LEN and depth == 0:
                steps.sample()
            else:
                steps.unknown()
            if wire_type == _GROUP_START:
                depth += 1
            elif wire_type == _GROUP_END:
                if depth == 0:
                    return
                depth -= 1
    except _NotCanonical:
        return


def _singular(fields: Iterable[tuple[int, int, int | memoryview]], expected: dict[int, int]) -> dict:
    """Known fields by number, each at most once and of its declared wire type; unknown ones dropped."""
    out: dict[int, int | memoryview] = {}
    for number, wire_type, value in fields:
        if number not in expected:
            continue
        if wire_type != expected[number] or number in out:
            raise _NotCanonical  # protobuf would treat it as unknown, or merge/override: its call
        out[number] = value
    return out


def _text(value: memoryview | None) -> str:
    if value is None:
        return ""
    try:
        return str(value, "utf-8")
    except UnicodeDecodeError:
        raise _NotCanonical from None


_IMAGE_FIELDS = {1: _VARINT, 2: _VARINT, 3: _VARINT, 4: _LEN}
_SAMPLE_FIELDS = {1: _LEN, 2: _LEN, 3: _LEN, 4: _LEN}
_REQUEST_FIELDS = {1: _LEN}


def _read_image(buf: memoryview, steps: _Steps) -> WireImage:
    fields = _singular(_fields(buf, steps, _IMAGE_FIELDS), _IMAGE_FIELDS)
    encoding, height, width = fields.get(1, 0), fields.get(2, 0), fields.get(3, 0)
    # int32 enum and uint32 sizes: protobuf truncates wider varints; leave those to it.
    if encoding >= 1 << 31 or height >= 1 << 32 or width >= 1 << 32:
        raise _NotCanonical
    return WireImage(encoding=encoding, height=height, width=width, data=fields.get(4, b""))


def _read_sample(buf: memoryview, steps: _Steps) -> WireSample:
    fields = _singular(_fields(buf, steps, _SAMPLE_FIELDS), _SAMPLE_FIELDS)
    return WireSample(
        image=_read_image(fields[1], steps) if 1 in fields else None,
        prompt=_text(fields.get(2)),
        metadata_json=_text(fields.get(3)),
        group_id=_text(fields.get(4)),
    )


def _read_request(buf: memoryview, steps: _Steps) -> WireRequest:
    samples = []
    for number, wire_type, value in _fields(buf, steps, _REQUEST_FIELDS):
        if number != 1:
            continue
        if wire_type != _LEN:
            raise _NotCanonical
        steps.sample()
        samples.append(_read_sample(value, steps))
    return WireRequest(samples=tuple(samples))
