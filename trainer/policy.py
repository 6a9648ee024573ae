"""The three policies of DiffusionNFT (REFERENCE §2) on one transformer: θ, θ_old and the EMA of θ.

θ and θ_old are the transformer's two LoRA adapters (``POLICY`` trained by the optimiser, ``OLD`` the
one rollouts sample with and the NFT loss reads v_old from); the EMA is a float32 copy of θ's adapter
weights that evaluation and exports use. θ is the active adapter except inside ``with policy.adapter(OLD)``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import SD3Transformer2DModel

from trainer.model import (
    OLD,
    POLICY,
    active_adapter,
    adapter_named_params,
    adapter_params,
    adapter_state,
    load_adapter_state,
    use_adapter,
)
from trainer.nft import NFTConfig, blend_, ema_decay, old_policy_decay

EMA = "ema"


class Policy:
    """θ, θ_old and the EMA, and the schedules that move θ_old and the EMA after each update."""

    def __init__(self, transformer: SD3Transformer2DModel, nft: NFTConfig) -> None:
        self.transformer = transformer
        self.nft = nft
        self.ema = {
            k: p.detach().clone().float() for k, p in adapter_named_params(transformer, POLICY).items()
        }
        self.global_step = 0
        """Optimiser steps taken so far: the clock of both schedules."""

    def trainable(self) -> list[torch.nn.Parameter]:
        """θ's adapter weights, what the optimiser updates."""
        return adapter_params(self.transformer, POLICY)

    @contextlib.contextmanager
    def adapter(self, name: str) -> Iterator[None]:
        """Run the transformer with adapter ``name`` (``OLD`` for rollouts and v_old), θ again after."""
        with active_adapter(self.transformer, name):
            yield

    def after_update(self, steps: int) -> float:
        """After an iteration's ``steps`` optimiser steps: the EMA after each step, then θ_old ← d·θ_old
        + (1 − d)·θ once (REFERENCE §2). Returns d."""
        theta = self.trainable()
        for _ in range(steps):
            self.global_step += 1
            if self.nft.ema:
                blend_(self.ema.values(), theta, ema_decay(self.global_step))
        decay = old_policy_decay(self.global_step, self.nft.old_decay)
        blend_(adapter_params(self.transformer, OLD), theta, decay)
        return decay

    def ema_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.ema.items()}

    def state(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every policy's weights, as a checkpoint stores them."""
        return {
            POLICY: adapter_state(self.transformer, POLICY),
            OLD: adapter_state(self.transformer, OLD),
            EMA: self.ema_state(),
        }

    def load_state(
        self, adapters: dict[str, dict[str, torch.Tensor]], global_step: int, where: object
    ) -> None:
        """Restore :meth:`state` (``where`` names the checkpoint in errors)."""
        load_adapter_state(self.transformer, POLICY, adapters[POLICY])
        load_adapter_state(self.transformer, OLD, adapters[OLD])
        if set(adapters[EMA]) != set(self.ema):
            raise ValueError(f"checkpoint {where} has an EMA for different adapter parameters")
        self.ema = {k: adapters[EMA][k].to(v.device).float().clone() for k, v in self.ema.items()}
        use_adapter(self.transformer, POLICY)
        self.global_step = global_step
