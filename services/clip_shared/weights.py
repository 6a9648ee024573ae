"""Finding real checkpoints (local path or hub id) and fingerprinting the weight files that were loaded.

The hub is only contacted when a real checkpoint is requested by hub id; local paths never touch the network.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from pathlib import Path

from services.core.hashing import file_sha256

HF_WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "model.safetensors.index.json")
HF_LEGACY_WEIGHT_PATTERNS = ("pytorch_model.bin", "pytorch_model-*.bin", "pytorch_model.bin.index.json")


def weights_sha256(paths: Sequence[Path]) -> str:
    """sha256 of one weight file; for several, sha256 over their ``"<sha256>  <name>\\n"`` lines in order.

    One file gives the digest anyone can check with ``sha256sum``; several (shards, or CLIP + a head) still
    give one stable fingerprint for the run's records.
    """
    if not paths:
        raise ValueError("no weight files to fingerprint")
    if len(paths) == 1:
        return file_sha256(paths[0])
    lines = "".join(f"{file_sha256(p)}  {p.name}\n" for p in paths)
    return hashlib.sha256(lines.encode()).hexdigest()


def hf_weight_files(directory: Path) -> list[Path]:
    """The weight files ``from_pretrained`` loads from ``directory``: safetensors if present, else .bin.

    Sharded checkpoints list their shards (sorted); the index json itself holds no weights.
    """
    for patterns in (HF_WEIGHT_PATTERNS, HF_LEGACY_WEIGHT_PATTERNS):
        found = sorted({p for pattern in patterns for p in directory.glob(pattern) if p.suffix != ".json"})
        if found:
            return found
    raise FileNotFoundError(
        f"no model weights in {directory}: expected model.safetensors (or shards) or pytorch_model.bin"
    )


def resolve_hf_dir(checkpoint: str, *, with_weights: bool = True) -> Path:
    """A local directory holding a transformers checkpoint: ``checkpoint`` itself, or a hub snapshot of it.

    From the hub only json/txt files (config, tokenizer, processor) and — with ``with_weights`` — the
    safetensors weights are fetched (pytorch_model.bin for repositories without safetensors), never the
    TF/Flax copies.
    """
    local = Path(checkpoint).expanduser()
    if local.is_dir():
        return local
    if local.exists() or checkpoint.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{checkpoint} is not a directory holding a transformers checkpoint")
    from huggingface_hub import snapshot_download

    text_files = ["*.json", "*.txt"]
    if not with_weights:
        return Path(snapshot_download(checkpoint, allow_patterns=text_files))
    directory = Path(snapshot_download(checkpoint, allow_patterns=[*text_files, *HF_WEIGHT_PATTERNS]))
    with contextlib.suppress(FileNotFoundError):
        hf_weight_files(directory)
        return directory
    return Path(snapshot_download(checkpoint, allow_patterns=[*text_files, *HF_LEGACY_WEIGHT_PATTERNS]))


def resolve_hub_file(checkpoint: str, filenames: Sequence[str]) -> Path:
    """A single weight file: ``checkpoint`` if it is a file, the first of ``filenames`` found in it if it is
    a directory, otherwise the first of ``filenames`` downloaded from the hub repository ``checkpoint``."""
    local = Path(checkpoint).expanduser()
    if local.is_file():
        return local
    if local.is_dir():
        for name in filenames:
            if (local / name).is_file():
                return local / name
        raise FileNotFoundError(f"none of {', '.join(filenames)} in {local}")
    if local.exists() or checkpoint.startswith((".", "/", "~")):
        raise FileNotFoundError(f"{checkpoint} does not exist")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    for name in filenames:
        with contextlib.suppress(EntryNotFoundError):  # try the next accepted file name
            return Path(hf_hub_download(checkpoint, name))
    raise FileNotFoundError(f"none of {', '.join(filenames)} in hub repository {checkpoint}")
