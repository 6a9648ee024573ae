"""Client side of TorchServe's gRPC inference API, without a copy of its .proto files.

The torchserve wheel ships no .proto files, but its frontend jar carries the compiled file descriptors
that the Java server itself was generated from (protobuf-java embeds each serialized
``FileDescriptorProto`` as string constants of the outer class). Reading them from the installed jar
gives message classes that always match the installed server, with no vendored copy to drift.

Only ``Predictions`` and ``Ping`` are exposed: the management API stays off in our configuration.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import grpc
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, empty_pb2, message_factory

from protos import reward_pb2
from services.core.metadata_keys import bearer
from services.torchserve.wire import read_reply

INFERENCE_CLASS = "org/pytorch/serve/grpc/inference/Inference.class"
STATUS_CLASS = "com/google/rpc/StatusProto.class"
SERVICE = "org.pytorch.serve.grpc.inference.InferenceAPIsService"


def frontend_jar() -> Path:
    """The installed TorchServe frontend jar (raises ImportError without the `torchserve` extra)."""
    import ts

    return Path(ts.__file__).parent / "frontend" / "model-server.jar"


def _modified_utf8_to_bytes(data: bytes) -> bytes:
    """Decode a class-file (modified UTF-8) string whose chars are all <= 0xFF back to raw bytes.

    protobuf-java stores descriptor bytes as a Latin-1 Java string; NUL and 0x80-0xFF become two-byte
    sequences in the class file.
    """
    out = bytearray()
    i = 0
    while i < len(data):
        byte = data[i]
        if byte < 0x80:
            out.append(byte)
            i += 1
        elif byte & 0xE0 == 0xC0:
            out.append(((byte & 0x1F) << 6) | (data[i + 1] & 0x3F))
            i += 2
        else:
            raise ValueError("descriptor string holds a character above 0xFF")
    return bytes(out)


def _string_constants(class_bytes: bytes) -> list[bytes]:
    """The CONSTANT_String values of a Java class file, in constant-pool order (JVMS §4.4)."""
    if class_bytes[:4] != b"\xca\xfe\xba\xbe":
        raise ValueError("not a Java class file")
    count = struct.unpack_from(">H", class_bytes, 8)[0]
    utf8: dict[int, bytes] = {}
    string_refs: list[int] = []
    pos, index = 10, 1
    fixed = {3: 4, 4: 4, 7: 2, 9: 4, 10: 4, 11: 4, 12: 4, 15: 3, 16: 2, 17: 4, 18: 4, 19: 2, 20: 2}
    while index < count:
        tag = class_bytes[pos]
        pos += 1
        if tag == 1:
            (length,) = struct.unpack_from(">H", class_bytes, pos)
            utf8[index] = class_bytes[pos + 2 : pos + 2 + length]
            pos += 2 + length
        elif tag == 8:
            string_refs.append(struct.unpack_from(">H", class_bytes, pos)[0])
            pos += 2
        elif tag in (5, 6):  # long and double take two pool slots
            pos += 8
            index += 1
        elif tag in fixed:
            pos += fixed[tag]
        else:
            raise ValueError(f"unknown constant-pool tag {tag}")
        index += 1
    return [utf8[ref] for ref in string_refs]


def descriptor_from_class(class_bytes: bytes, proto_name: str) -> descriptor_pb2.FileDescriptorProto:
    """The FileDescriptorProto named ``proto_name`` embedded in a protobuf-java outer class."""
    pieces = [_modified_utf8_to_bytes(s) for s in _string_constants(class_bytes)]
    header = b"\n" + bytes([len(proto_name)]) + proto_name.encode()
    starts = [i for i, piece in enumerate(pieces) if piece.startswith(header)]
    if not starts:
        raise ValueError(f"no descriptor for {proto_name} in the class file")
    # Long descriptors are split over consecutive constants; take the shortest run that parses back
    # to exactly the same bytes.
    data = b""
    for piece in pieces[starts[0] :]:
        data += piece
        proto = descriptor_pb2.FileDescriptorProto()
        try:
            proto.ParseFromString(data)
        except Exception:  # a truncated descriptor: add the next piece
            continue
        if proto.name == proto_name and proto.SerializeToString() == data:
            return proto
    raise ValueError(f"descriptor for {proto_name} does not parse")


@dataclass(frozen=True)
class InferenceAPI:
    """Message classes of TorchServe's inference service."""

    PredictionsRequest: type
    PredictionResponse: type
    TorchServeHealthResponse: type


@cache
def inference_api(jar: Path | None = None) -> InferenceAPI:
    """Build the inference message classes from the installed jar's descriptors (cached)."""
    with zipfile.ZipFile(jar or frontend_jar()) as archive:
        status = descriptor_from_class(archive.read(STATUS_CLASS), "google/rpc/status.proto")
        inference = descriptor_from_class(archive.read(INFERENCE_CLASS), "inference.proto")
    pool = descriptor_pool.DescriptorPool()
    for module in (any_pb2, empty_pb2):
        pool.Add(descriptor_pb2.FileDescriptorProto.FromString(module.DESCRIPTOR.serialized_pb))
    pool.Add(status)
    pool.Add(inference)
    package = inference.package

    def cls(name: str) -> type:
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{package}.{name}"))

    return InferenceAPI(
        PredictionsRequest=cls("PredictionsRequest"),
        PredictionResponse=cls("PredictionResponse"),
        TorchServeHealthResponse=cls("TorchServeHealthResponse"),
    )


class InferenceClient:
    """Blocking client of ``Predictions`` and ``Ping``; ``score`` speaks the reward contract through it."""

    def __init__(self, channel: grpc.Channel, token: str | None = None) -> None:
        api = inference_api()
        self._metadata = bearer(token)
        self._predictions = channel.unary_unary(
            f"/{SERVICE}/Predictions",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=api.PredictionResponse.FromString,
        )
        self._ping = channel.unary_unary(
            f"/{SERVICE}/Ping",
            request_serializer=lambda m: m.SerializeToString(),
            response_deserializer=api.TorchServeHealthResponse.FromString,
        )
        self._api = api

    def predict(self, model: str, inputs: dict[str, bytes], *, timeout: float | None = None) -> bytes:
        request = self._api.PredictionsRequest(model_name=model, input=inputs)
        return self._predictions(request, metadata=self._metadata, timeout=timeout).prediction

    def score(
        self, model: str, request: reward_pb2.ScoreRequest, *, timeout: float | None = None
    ) -> reward_pb2.ScoreResponse:
        """Score through the handler; raises ``wire.ReplyError`` when it refused or failed the request."""
        reply = self.predict(model, {"score_request": request.SerializeToString()}, timeout=timeout)
        return read_reply(reply)

    def ping(self, *, timeout: float | None = None) -> str:
        return self._ping(empty_pb2.Empty(), metadata=self._metadata, timeout=timeout).health
