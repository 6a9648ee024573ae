"""Which sampler timesteps the NFT update trains on."""

from __future__ import annotations

import torch

from trainer.update import train_sigmas


def test_nine_of_ten_shuffled_timesteps_per_sample() -> None:
    sigmas = torch.linspace(1.0, 0.0, 11)  # 10 sampler steps; the final 0 is never a training time
    picked = train_sigmas(sigmas, 0.99, [torch.Generator().manual_seed(i) for i in range(6)])
    assert picked.shape == (6, 9)  # int(0.99 · 10) = 9, as DiffusionNFT
    for row in picked:
        assert len(set(row.tolist())) == 9 and set(row.tolist()) <= set(sigmas[:-1].tolist())
    assert len({tuple(row.tolist()) for row in picked}) > 1  # each sample has its own order
    again = train_sigmas(sigmas, 0.99, [torch.Generator().manual_seed(i) for i in (3, 0)])
    assert torch.equal(again, picked[[3, 0]])  # a sample's timesteps are its generator's, wherever it is
