"""TorchServe handler serving any registered scorer (the entry point packed into every ``.mar``).

Wire format: each TorchServe request carries one serialized ``e2po.reward.v1.ScoreRequest`` — as the
``score_request`` input of the gRPC ``Predictions`` call, or as the raw body of a REST
``POST /predictions/<model>`` with ``Content-Type: application/x-protobuf`` — and gets a serialized
``ScoreResponse`` back (or an error reply, see ``wire.py``). It is the gRPC contract's own message, so
decoding, limits, outputs and model identity are the same as on the native server, and nothing is
ever pickled.

TorchServe merges up to ``batchSize`` requests into one ``handle`` call; their samples are scored in
model calls of at most ``max_batch_images`` images (groups never split), one bad request fails alone.
TorchServe loads this file as a top-level module and requires exactly one class in it.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from pathlib import Path
from typing import Any

from services.core.budget import PixelBudget, Reservation
from services.core.packing import pack_groups
from services.core.request import RequestError, decode_samples, score_response
from services.core.runner import JobResult, run_jobs
from services.core.scorer import ScoreBatch, Scorer
from services.registry import build_scorer
from services.torchserve.spec import SPEC_FILE, ArchiveSpec
from services.torchserve.wire import error_reply, parse_request

log = logging.getLogger(__name__)

INPUT_KEYS = ("score_request", "body", "data")
"""Where the request bytes may sit: gRPC input name, REST raw body, REST form field."""
CONTENT_TYPE = "application/x-protobuf"


class RewardHandler:
    """``initialize`` builds the archive's scorer; ``handle`` scores a TorchServe batch of requests."""

    def __init__(self) -> None:
        self.scorer: Scorer | None = None
        self.spec: ArchiveSpec | None = None
        self.initialized = False

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        spec = ArchiveSpec.from_json((Path(properties["model_dir"]) / SPEC_FILE).read_text())
        device = _worker_device(spec.device, properties.get("gpu_id"))
        scorer = build_scorer(
            spec.scorer, checkpoint=spec.checkpoint, tiny=spec.tiny, device=device, **spec.options
        )
        self.attach(scorer, spec)
        log.info("serving %s (%s) on %s", spec.scorer, scorer.identity.checkpoint_sha256, device)

    def attach(self, scorer: Scorer, spec: ArchiveSpec) -> None:
        """Serve ``scorer`` with ``spec``'s limits (``initialize`` calls this; tests call it directly)."""
        self.scorer, self.spec = scorer, spec
        self.initialized = True

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[bytes]:
        """One reply per request: decode each, score all their samples together, answer each."""
        assert self.scorer is not None and self.spec is not None, "handle() before initialize()"
        replies: list[bytes] = [b""] * len(data)
        batches: dict[int, ScoreBatch] = {}
        for position, item in enumerate(data):
            try:
                batches[position] = self._decode(item, len(data))
            except RequestError as exc:
                replies[position] = _fail(context, position, 400, str(exc))
        for position, parts in self._score(batches).items():
            replies[position] = self._reply(context, position, len(batches[position]), parts)
        return replies

    def _decode(self, item: dict[str, Any], batch_requests: int) -> ScoreBatch:
        assert self.scorer is not None and self.spec is not None
        limits = self.spec.limits()
        # One worker scores one batch at a time, so each request gets its full pixel allowance and the
        # per-request limit is the one that binds.
        budget = PixelBudget(limits.max_pixels_per_request * batch_requests)
        reservation = Reservation(budget, limits.max_pixels_per_request)
        request = parse_request(_request_bytes(item), limits)
        return decode_samples(request, self.scorer, limits, reservation.take)

    def _score(
        self, batches: dict[int, ScoreBatch]
    ) -> dict[int, list[tuple[list[int], JobResult | Exception]]]:
        """Whole groups packed into model calls of at most ``max_batch_images`` images, across requests."""
        assert self.scorer is not None and self.spec is not None
        jobs = [
            (position, indices, batch.select(indices))
            for position, batch in batches.items()
            for indices in pack_groups(batch.group_ids, max_count=self.spec.max_batch_images)
        ]
        results: dict[int, list[tuple[list[int], JobResult | Exception]]] = {p: [] for p in batches}
        for call in _model_calls(jobs, self.spec.max_batch_images):
            outcomes = run_jobs(self.scorer, [job for _, _, job in call])
            for (position, indices, _), outcome in zip(call, outcomes, strict=True):
                results[position].append((indices, outcome))
        return results

    def _reply(
        self,
        context: Any,
        position: int,
        num_samples: int,
        parts: list[tuple[list[int], JobResult | Exception]],
    ) -> bytes:
        assert self.scorer is not None and self.spec is not None
        failure = next((outcome for _, outcome in parts if isinstance(outcome, Exception)), None)
        if isinstance(failure, ValueError):
            return _fail(context, position, 400, f"scorer rejected the input: {failure}")
        if failure is not None:
            log.error("scorer %s failed", self.scorer.identity.name, exc_info=failure)
            return _fail(context, position, 500, f"scorer failed: {type(failure).__name__}: {failure}")
        done = [(indices, outcome) for indices, outcome in parts if isinstance(outcome, JobResult)]
        response = score_response(done, num_samples, self.scorer, self.spec.limits())
        context.set_response_content_type(position, CONTENT_TYPE)
        return response.SerializeToString()


def _worker_device(device: str, gpu_id: int | str | None) -> str:
    # TorchServe pins each worker to one GPU; "cuda" means that one, an explicit index is kept.
    if device == "cuda" and gpu_id is not None:
        return f"cuda:{gpu_id}"
    return device


def _request_bytes(item: dict[str, Any]) -> bytes | bytearray:
    for key in INPUT_KEYS:
        if key in item:
            value = item[key]
            if not isinstance(value, bytes | bytearray):
                raise RequestError(
                    f"input {key!r} must be a serialized ScoreRequest sent as {CONTENT_TYPE}, "
                    f"got {type(value).__name__}"
                )
            return value
    raise RequestError(f"no request bytes: expected one of the inputs {', '.join(INPUT_KEYS)}")


def _model_calls(jobs: list[tuple[int, list[int], ScoreBatch]], max_images: int) -> list[list[Any]]:
    """Consecutive jobs packed into calls of at most ``max_images`` images (a bigger job runs alone)."""
    calls: list[list[Any]] = []
    current: list[Any] = []
    count = 0
    for job in jobs:
        if current and count + len(job[2]) > max_images:
            calls.append(current)
            current, count = [], 0
        current.append(job)
        count += len(job[2])
    if current:
        calls.append(current)
    return calls


def _fail(context: Any, position: int, code: int, message: str) -> bytes:
    # The status reaches REST clients only; the reply's own prefix carries it over gRPC (see wire.py).
    # The reason phrase is HTTP's own ASCII one, never the sentence: TorchServe 0.12 frames the phrase
    # by its character count but writes UTF-8 bytes, so a '·' in it corrupted the worker's reply frame
    # and killed the worker, failing every request batched with the bad one. The sentence is the body.
    context.set_response_status(code=code, phrase=HTTPStatus(code).phrase, idx=position)
    context.set_response_content_type(position, "text/plain; charset=utf-8")
    return error_reply(code, message)
