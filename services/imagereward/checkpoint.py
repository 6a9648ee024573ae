"""Loading ``ImageReward.pt`` + ``med_config.json`` with upstream's key names, strictly.

Upstream loads with ``strict=False``, which would silently leave a renamed or missing weight at its random
initialisation; here every weight the reward uses must be present with its exact shape. Keys the reward never
reads are dropped by name: BLIP's contrastive projections (``blip.vision_proj``, ``blip.text_proj``) and the
text encoder's ``position_ids`` buffer (always ``arange``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from services.imagereward.med import TextConfig
from services.imagereward.model import ImageRewardModel
from services.imagereward.preprocess import VOCAB_FILE
from services.imagereward.vit import VisionConfig

log = logging.getLogger(__name__)

WEIGHTS_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
HUB_REPO = "THUDM/ImageReward"
HUB_TOKENIZER_REPO = "google-bert/bert-base-uncased"

# upstream prefix → local prefix (local attribute names mirror upstream's, minus the ``blip.`` wrapper)
KEY_PREFIXES = {
    "blip.visual_encoder.": "visual_encoder.",
    "blip.text_encoder.": "text_encoder.",
    "mlp.": "mlp.",
}
UNUSED_KEYS = frozenset({"blip.text_encoder.embeddings.position_ids"})
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")


@dataclass(frozen=True, kw_only=True)
class CheckpointFiles:
    weights: Path
    med_config: Path
    vocab_dir: Path
    """Directory holding bert-base-uncased's ``vocab.txt``."""


def from_upstream_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Upstream ``ImageReward`` state-dict names → :class:`ImageRewardModel` names.

    Known-unused keys are dropped; keys under no known prefix are dropped with a warning (upstream ignores
    them too). Keys under a used prefix are all kept, so ``load_state_dict(strict=True)`` catches any surplus.
    """
    mapped: dict[str, torch.Tensor] = {}
    unknown: list[str] = []
    for key, value in state.items():
        if key in UNUSED_KEYS or key.startswith(UNUSED_PREFIXES):
            continue
        for upstream, local in KEY_PREFIXES.items():
            if key.startswith(upstream):
                mapped[local + key[len(upstream) :]] = value
                break
        else:
            unknown.append(key)
    if unknown:
        log.warning(
            "ignoring %d checkpoint keys ImageReward does not use, e.g. %s", len(unknown), unknown[:5]
        )
    return mapped


def to_upstream_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`from_upstream_keys` on the used keys (to write checkpoints in upstream's layout)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for upstream, local in KEY_PREFIXES.items():
            if key.startswith(local):
                out[upstream + key[len(local) :]] = value
                break
        else:
            raise KeyError(f"{key!r} has no upstream name")
    return out


def resolve_files(checkpoint: str) -> CheckpointFiles:
    """A local directory with ImageReward.pt, med_config.json and vocab.txt (or the weights file itself, the
    other two beside it); otherwise a hub repo id (``THUDM/ImageReward``), downloaded only because it was
    asked for explicitly."""
    path = Path(checkpoint).expanduser()
    if path.exists():
        directory = path.parent if path.is_file() else path
        files = CheckpointFiles(
            weights=path if path.is_file() else directory / WEIGHTS_FILE,
            med_config=directory / MED_CONFIG_FILE,
            vocab_dir=directory,
        )
        required = (files.weights, files.med_config, directory / VOCAB_FILE)
        missing = [p.name for p in required if not p.is_file()]
        if missing:
            raise ValueError(
                f"{directory} lacks {', '.join(missing)} (need ImageReward.pt, med_config.json, vocab.txt)"
            )
        return files
    if checkpoint.count("/") != 1:
        raise ValueError(
            f"--checkpoint {checkpoint!r} is neither a directory nor a hub repo id like {HUB_REPO!r}"
        )
    from huggingface_hub import hf_hub_download

    vocab = hf_hub_download(HUB_TOKENIZER_REPO, VOCAB_FILE)
    return CheckpointFiles(
        weights=Path(hf_hub_download(checkpoint, WEIGHTS_FILE)),
        med_config=Path(hf_hub_download(checkpoint, MED_CONFIG_FILE)),
        vocab_dir=Path(vocab).parent,
    )


def load_model(files: CheckpointFiles, vision: VisionConfig | None = None) -> ImageRewardModel:
    """ViT-L/16 (upstream's fixed ``vit='large'``; another shape only for tests) + the text encoder described
    by med_config.json, with its cross-attention reading the ViT width as BLIP sets it."""
    vision = vision or VisionConfig()
    med = json.loads(files.med_config.read_text(encoding="utf-8"))
    text = TextConfig.from_med_config(med, encoder_width=vision.width)
    with torch.device("meta"):  # no random init of ~470M parameters that are overwritten at once
        model = ImageRewardModel(vision, text)
    state = torch.load(files.weights, map_location="cpu", weights_only=True)
    model.load_state_dict(from_upstream_keys(state), strict=True, assign=True)
    return model.float()  # upstream scores in float32 whatever dtype the file was saved in
