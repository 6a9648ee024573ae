"""Atomic, complete checkpoints: a resumed run continues bit-for-bit.

A checkpoint directory holds θ, θ_old and the EMA (safetensors), the optimiser state, every RNG
state the run draws from, the prompt stream position and the counters. It is written to a temporary
directory and renamed into place, and ``latest`` is replaced atomically after that, so a crash or a
full disk mid-write leaves the previous checkpoint untouched and still ``latest``. ``latest`` is a relative
symlink, so ``checkpoints/latest/lora`` is a path any tool opens. The EMA adapter is also exported, with its
rank, alpha and target modules, in the layout ``StableDiffusion3Pipeline.load_lora_weights(dir)`` reads.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LATEST = "latest"


class CheckpointError(OSError):
    """A checkpoint could not be written (disk full, read-only, ...); the previous one is untouched."""


@dataclass
class TrainerState:
    """Everything besides tensors that a resumed run needs."""

    iteration: int
    global_step: int
    prompt_stream: dict[str, int]
    extra: dict[str, Any]


def save_checkpoint(
    root: Path,
    *,
    state: TrainerState,
    adapters: dict[str, dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    generators: dict[str, torch.Generator],
    lora_export: dict[str, torch.Tensor] | None = None,
    lora_config: dict[str, Any] | None = None,
    keep_last: int = 2,
) -> Path:
    """Write checkpoint ``iter-NNNNNN`` under ``root`` atomically and point ``latest`` at it.

    ``lora_export`` (adapter tensors under peft's names) is written to ``lora/`` with ``lora_config``
    (``LoraConfig`` keyword arguments: r, lora_alpha, target_modules), which both are required for.
    """
    if (lora_export is None) != (lora_config is None):
        raise ValueError("lora_export and lora_config go together: an adapter without its alpha loads wrong")
    root.mkdir(parents=True, exist_ok=True)
    name = f"iter-{state.iteration:06d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        tensors = {
            f"{adapter}/{key}": value.contiguous().cpu()
            for adapter, sd in adapters.items()
            for key, value in sd.items()
        }
        save_file(tensors, tmp / "adapters.safetensors")
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        rng = {f"torch_generator/{k}": g.get_state() for k, g in generators.items()}
        rng["torch_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available():
            for i, s in enumerate(torch.cuda.get_rng_state_all()):
                rng[f"torch_cuda/{i}"] = s
        save_file(rng, tmp / "rng.safetensors")
        meta = {
            "iteration": state.iteration,
            "global_step": state.global_step,
            "prompt_stream": state.prompt_stream,
            "extra": state.extra,
            "python_random": _jsonable(random.getstate()),
            "numpy_random": _jsonable(np.random.get_state()),
        }
        (tmp / "state.json").write_text(json.dumps(meta, indent=2))
        if lora_export is not None and lora_config is not None:
            export_lora(tmp / "lora", lora_export, lora_config)
        _fsync_dir(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        kept = _latest_name(root)
        # torch.save reports ENOSPC as "unexpected pos ..." without an errno; say it in plain words.
        disk_full = not isinstance(exc, OSError) and shutil.disk_usage(root).free < 1024 * 1024
        cause = "No space left on device; " if disk_full else ""
        previous = (
            f"the previous checkpoint {kept} is intact and still latest" if kept else "no earlier checkpoint"
        )
        code = (
            exc.errno if isinstance(exc, OSError) and exc.errno else errno.ENOSPC if disk_full else errno.EIO
        )
        raise CheckpointError(
            code,
            f"could not write checkpoint {name} under {root}: {cause}{type(exc).__name__}: {exc}; {previous}",
        ) from exc
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _point_latest(root, name)
    _prune(root, keep_last)
    return final


def load_checkpoint(
    path: Path, *, optimizer: torch.optim.Optimizer, generators: dict[str, torch.Generator]
) -> tuple[TrainerState, dict[str, dict[str, torch.Tensor]]]:
    """Restore optimiser and RNG states in place; return the trainer state and adapter tensors."""
    path = resolve(path)
    tensors = load_file(path / "adapters.safetensors")
    adapters: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        adapter, _, name = key.partition("/")
        adapters.setdefault(adapter, {})[name] = value
    optimizer.load_state_dict(torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True))
    rng = load_file(path / "rng.safetensors")
    for key, generator in generators.items():
        generator.set_state(rng[f"torch_generator/{key}"])
    torch.set_rng_state(rng["torch_cpu"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(k for k in rng if k.startswith("torch_cuda/"))]
        if states:
            torch.cuda.set_rng_state_all(states)
    meta = json.loads((path / "state.json").read_text())
    random.setstate(_tuplify(meta["python_random"]))
    np_state = meta["numpy_random"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))
    state = TrainerState(meta["iteration"], meta["global_step"], meta["prompt_stream"], meta["extra"])
    return state, adapters


def resolve(path: Path) -> Path:
    """A checkpoint dir, a checkpoints root (→ its latest) or a run dir (→ checkpoints/latest)."""
    path = Path(path)
    for candidate in (path, path / "checkpoints"):
        if (candidate / "state.json").exists():
            return candidate
        name = _latest_name(candidate)
        if name is not None:
            return candidate / name
    raise FileNotFoundError(f"no checkpoint found at {path}")


def export_lora(
    directory: Path, transformer_lora: dict[str, torch.Tensor], lora_config: dict[str, Any]
) -> None:
    """Save adapter tensors so ``StableDiffusion3Pipeline.load_lora_weights(directory)`` applies them as
    trained.

    ``lora_config`` goes into the safetensors header as diffusers' ``lora_adapter_metadata``, from which
    ``load_lora_weights`` builds the adapter's ``LoraConfig``. Without it diffusers infers r from the tensor
    shapes and takes alpha = r, which scales the update by r / alpha (half strength for alpha = 2r).
    """
    from diffusers import StableDiffusion3Pipeline

    StableDiffusion3Pipeline.save_lora_weights(
        directory,
        transformer_lora_layers={k: v.cpu() for k, v in transformer_lora.items()},
        transformer_lora_adapter_metadata=dict(lora_config),
    )


def _latest_name(root: Path) -> str | None:
    """The checkpoint ``latest`` names: a symlink's target, or (older runs) a one-line file's text."""
    pointer = root / LATEST
    if pointer.is_symlink():
        return os.readlink(pointer)
    return pointer.read_text().strip() if pointer.is_file() else None


def _point_latest(root: Path, name: str) -> None:
    """Replace ``latest`` atomically (rename over it) with a relative symlink to ``name``."""
    tmp = root / f".{LATEST}.tmp"
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(name, tmp, target_is_directory=True)
    os.replace(tmp, root / LATEST)


def _prune(root: Path, keep_last: int) -> None:
    if keep_last <= 0:
        return
    done = sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("iter-"))
    for old in done[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _fsync_dir(directory: Path) -> None:
    for path in directory.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.integer):
        return int(value)
    return value


def _tuplify(value: Any) -> Any:
    return tuple(_tuplify(v) for v in value) if isinstance(value, list) else value
