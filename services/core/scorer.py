"""The scorer interface every reward model implements.

A scorer is a small object: it knows its identity, validates one sample's prompt/metadata cheaply
(before the request is queued, so bad input is rejected without touching the model) and scores a
batch. The gRPC server, the TorchServe handler and in-process callers (tests, the local demo) all
drive the same object.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch


@dataclass(frozen=True, kw_only=True)
class ModelIdentity:
    """What a run records about the reward it trained on."""

    name: str
    """Registry name of the scorer, e.g. ``"pickscore"``."""
    version: str
    """Implementation version; bump whenever the same input can score differently."""
    checkpoint_sha256: str
    """sha256 of the loaded weights, or ``"tiny:<seed>"`` for a tiny model built from a config."""
    outputs: tuple[str, ...]
    """Per-sample output names, in a stable order."""
    group_outputs: tuple[str, ...] = ()
    """Per-group output names (computed over the samples sharing a ``group_id``)."""
    preferred_size: tuple[int, int] | None = None
    """(height, width) the preprocessing is tuned for; None when any size is fine."""
    requires_metadata: bool = False
    """Whether every sample must carry metadata (e.g. GenEval)."""


@dataclass(kw_only=True)
class ScoreBatch:
    """A batch of samples to score. All lists have the same length B."""

    images: Sequence[torch.Tensor]
    """B uint8 tensors of shape (3, H, W), RGB; sizes may differ between samples. Inputs only: a
    server's are views of the request body, and a failed merged batch is rescored job by job, so a
    scorer never writes into them."""
    prompts: Sequence[str]
    metadata: Sequence[Mapping[str, Any] | None]
    """Parsed per-sample metadata (already checked by :meth:`Scorer.validate`), or None."""
    group_ids: Sequence[str] = ()
    """Per-sample group keys ("" = no group); empty sequence = no groups at all."""

    def __post_init__(self) -> None:
        if not self.group_ids:
            self.group_ids = [""] * len(self.images)
        sizes = {len(self.images), len(self.prompts), len(self.metadata), len(self.group_ids)}
        if len(sizes) != 1:
            raise ValueError(
                f"ScoreBatch fields must have equal lengths, got images={len(self.images)}, "
                f"prompts={len(self.prompts)}, metadata={len(self.metadata)}, group_ids={len(self.group_ids)}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def select(self, indices: Sequence[int]) -> ScoreBatch:
        """The samples at ``indices``, in that order (images are not copied)."""
        return ScoreBatch(
            images=[self.images[i] for i in indices],
            prompts=[self.prompts[i] for i in indices],
            metadata=[self.metadata[i] for i in indices],
            group_ids=[self.group_ids[i] for i in indices],
        )

    def stacked_images(self) -> torch.Tensor:
        """All images as one (B, 3, H, W) uint8 tensor; raises if their sizes differ."""
        shapes = {tuple(image.shape) for image in self.images}
        if len(shapes) != 1:
            raise ValueError(f"images of different sizes cannot be stacked: {sorted(shapes)}")
        return torch.stack(list(self.images))


@dataclass(kw_only=True)
class ScoreOutput:
    """What a scorer returns for a batch."""

    samples: dict[str, torch.Tensor]
    """Output name → (B,) tensor, one entry per name in ``identity.outputs``."""
    groups: dict[str, dict[str, float]] = field(default_factory=dict)
    """group_id → (group output name → value), for every non-empty group id in the batch."""


@runtime_checkable
class Scorer(Protocol):
    """A reward model that scores batches of images against their prompts."""

    @property
    def identity(self) -> ModelIdentity: ...

    def validate(self, prompt: str, metadata: Mapping[str, Any] | None) -> None:
        """Raise ValueError with one sentence if this sample cannot be scored."""
        ...

    def score(self, batch: ScoreBatch) -> ScoreOutput:
        """Score a batch; called from a worker thread, one batch at a time."""
        ...


def require_one_source(name: str, checkpoint: str | None, tiny: bool, example: str) -> None:
    """A scorer loads either a tiny model built from a config (``--tiny``) or real weights
    (``--checkpoint``): exactly one; ``example`` says what a checkpoint is for this scorer."""
    if tiny == (checkpoint is not None):
        raise ValueError(f"{name} needs exactly one of --tiny or --checkpoint ({example})")


def check_output(identity: ModelIdentity, batch: ScoreBatch, output: ScoreOutput) -> None:
    """Fail loudly when a scorer's output does not match its declared identity.

    A missing, extra or wrongly sized output would otherwise turn into a silently wrong reward.
    """
    expected = set(identity.outputs)
    if set(output.samples) != expected:
        raise RuntimeError(
            f"scorer {identity.name} returned outputs {sorted(output.samples)}, declared {sorted(expected)}"
        )
    for name, values in output.samples.items():
        if tuple(values.shape) != (len(batch),):
            raise RuntimeError(
                f"scorer {identity.name} output {name!r} has shape {tuple(values.shape)}, "
                f"expected ({len(batch)},)"
            )
    group_ids = {g for g in batch.group_ids if g}
    if identity.group_outputs:
        if set(output.groups) != group_ids:
            raise RuntimeError(
                f"scorer {identity.name} returned groups {sorted(output.groups)}, "
                f"expected {sorted(group_ids)}"
            )
        for gid, values in output.groups.items():
            if set(values) != set(identity.group_outputs):
                raise RuntimeError(
                    f"scorer {identity.name} group {gid!r} has outputs {sorted(values)}, "
                    f"declared {sorted(identity.group_outputs)}"
                )
