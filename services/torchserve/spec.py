"""What an archive serves: the scorer, how to build it, and the gRPC server's limits and batching.

Stored as ``scorer.json`` inside each ``.mar`` so the handler builds exactly the scorer the archive was
made for, and read back by the config writer for the per-model batching settings.
"""

from __future__ import annotations

import json
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from services.core.batcher import BatcherConfig
from services.core.codec import ImageLimits
from services.core.request import RequestLimits

SPEC_FILE = "scorer.json"


@dataclass(frozen=True, kw_only=True)
class ArchiveSpec:
    """One scorer as a TorchServe model. Defaults are the gRPC server's (``services.serve``)."""

    scorer: str
    """Registry name (``services.registry.SCORERS``); also the TorchServe model name."""
    tiny: bool = False
    """Tiny model built offline from a config (tests, demos)."""
    checkpoint: str | None = None
    """Path of the real weights on the serving host; weights are not packed into the archive."""
    device: str = "cpu"
    """``cuda`` means the GPU TorchServe assigns to the worker (``cuda:<gpu_id>``)."""
    options: dict[str, Any] = field(default_factory=dict)
    """The scorer's own options (its ``add_arguments``), as keywords of its ``build``."""
    max_batch_images: int = BatcherConfig.max_batch_images
    """Images per model call; TorchServe's own batch counts requests, so the handler splits further."""
    max_delay_ms: float = BatcherConfig.max_delay_ms
    """TorchServe ``maxBatchDelay``: how long the first request waits for others to join its batch."""
    batch_requests: int = 8
    """TorchServe ``batchSize``: requests handed to one handler call."""
    max_images_per_request: int = RequestLimits.max_images_per_request
    max_request_bytes: int = RequestLimits.max_request_bytes
    max_pixels: int = ImageLimits.max_pixels
    max_pixels_per_request: int = RequestLimits.max_pixels_per_request

    def __post_init__(self) -> None:
        for name in ("max_batch_images", "batch_requests", "max_images_per_request", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {self.max_delay_ms}")
        self.limits()  # the request limits validate themselves, as on the gRPC server

    def limits(self) -> RequestLimits:
        return RequestLimits(
            max_images_per_request=self.max_images_per_request,
            max_request_bytes=self.max_request_bytes,
            max_pixels_per_request=self.max_pixels_per_request,
            image=ImageLimits(max_pixels=self.max_pixels),
        )

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ArchiveSpec:
        return cls(**json.loads(text))

    @classmethod
    def from_archive(cls, mar: Path) -> ArchiveSpec:
        """Read the spec back from a built ``.mar`` (a zip file)."""
        with zipfile.ZipFile(mar) as archive:
            return cls.from_json(archive.read(SPEC_FILE).decode())
