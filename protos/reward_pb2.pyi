from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ImageEncoding(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_ENCODING_RAW_RGB8: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_PNG: _ClassVar[ImageEncoding]
    IMAGE_ENCODING_JPEG: _ClassVar[ImageEncoding]
IMAGE_ENCODING_RAW_RGB8: ImageEncoding
IMAGE_ENCODING_PNG: ImageEncoding
IMAGE_ENCODING_JPEG: ImageEncoding

class Image(_message.Message):
    __slots__ = ("encoding", "height", "width", "data")
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    encoding: ImageEncoding
    height: int
    width: int
    data: bytes
    def __init__(self, encoding: _Optional[_Union[ImageEncoding, str]] = ..., height: _Optional[int] = ..., width: _Optional[int] = ..., data: _Optional[bytes] = ...) -> None: ...

class Sample(_message.Message):
    __slots__ = ("image", "prompt", "metadata_json", "group_id")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    image: Image
    prompt: str
    metadata_json: str
    group_id: str
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., prompt: _Optional[str] = ..., metadata_json: _Optional[str] = ..., group_id: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("samples",)
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    samples: _containers.RepeatedCompositeFieldContainer[Sample]
    def __init__(self, samples: _Optional[_Iterable[_Union[Sample, _Mapping]]] = ...) -> None: ...

class SampleScores(_message.Message):
    __slots__ = ("values",)
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.ScalarMap[str, float]
    def __init__(self, values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class GroupScores(_message.Message):
    __slots__ = ("group_id", "values")
    class ValuesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    GROUP_ID_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    group_id: str
    values: _containers.ScalarMap[str, float]
    def __init__(self, group_id: _Optional[str] = ..., values: _Optional[_Mapping[str, float]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("scores", "groups", "model")
    SCORES_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    scores: _containers.RepeatedCompositeFieldContainer[SampleScores]
    groups: _containers.RepeatedCompositeFieldContainer[GroupScores]
    model: ModelInfo
    def __init__(self, scores: _Optional[_Iterable[_Union[SampleScores, _Mapping]]] = ..., groups: _Optional[_Iterable[_Union[GroupScores, _Mapping]]] = ..., model: _Optional[_Union[ModelInfo, _Mapping]] = ...) -> None: ...

class DescribeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "version", "checkpoint_sha256", "outputs", "group_outputs", "preferred_height", "preferred_width", "max_images_per_request", "max_pixels_per_image", "max_request_bytes", "requires_metadata", "accepts_score_stream")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_SHA256_FIELD_NUMBER: _ClassVar[int]
    OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    GROUP_OUTPUTS_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    PREFERRED_WIDTH_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGES_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_PIXELS_PER_IMAGE_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_BYTES_FIELD_NUMBER: _ClassVar[int]
    REQUIRES_METADATA_FIELD_NUMBER: _ClassVar[int]
    ACCEPTS_SCORE_STREAM_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    checkpoint_sha256: str
    outputs: _containers.RepeatedScalarFieldContainer[str]
    group_outputs: _containers.RepeatedScalarFieldContainer[str]
    preferred_height: int
    preferred_width: int
    max_images_per_request: int
    max_pixels_per_image: int
    max_request_bytes: int
    requires_metadata: bool
    accepts_score_stream: bool
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., checkpoint_sha256: _Optional[str] = ..., outputs: _Optional[_Iterable[str]] = ..., group_outputs: _Optional[_Iterable[str]] = ..., preferred_height: _Optional[int] = ..., preferred_width: _Optional[int] = ..., max_images_per_request: _Optional[int] = ..., max_pixels_per_image: _Optional[int] = ..., max_request_bytes: _Optional[int] = ..., requires_metadata: _Optional[bool] = ..., accepts_score_stream: _Optional[bool] = ...) -> None: ...
