"""SD3 text conditioning, with the CLIP-L token-embedding injection point E2PO perturbs.

The layout follows diffusers' StableDiffusion3Pipeline.encode_prompt exactly:
``prompt_embeds`` = [CLIP-L hidden[-2] ‖ CLIP-G hidden[-2]] zero-padded to the joint attention width,
then concatenated along the sequence with T5's embeddings (zeros when T5 is absent);
``pooled`` = [CLIP-L text_embeds ‖ CLIP-G text_embeds].

transformers' CLIPTextModel takes no ``inputs_embeds``, so perturbed token embeddings are injected by
a forward hook on ``text_model.embeddings.token_embedding``: the hook replaces the lookup output,
position embeddings are still added after it, and EOS pooling (by input ids) is unaffected.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainer.sampler import blend_condition


@dataclass
class Conditioning:
    """SD3 conditioning for a batch: prompt_embeds (B, S, D) and pooled (B, P)."""

    prompt_embeds: torch.Tensor
    pooled: torch.Tensor

    def __len__(self) -> int:
        return self.prompt_embeds.shape[0]

    def __getitem__(self, index: torch.Tensor | slice | int) -> Conditioning:
        if isinstance(index, int):
            index = slice(index, index + 1)
        return Conditioning(self.prompt_embeds[index], self.pooled[index])

    def to(self, *args, **kwargs) -> Conditioning:
        return Conditioning(self.prompt_embeds.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @staticmethod
    def cat(items: Sequence[Conditioning]) -> Conditioning:
        return Conditioning(torch.cat([c.prompt_embeds for c in items]), torch.cat([c.pooled for c in items]))

    @staticmethod
    def blend(c_opt: Conditioning, c_orig: Conditioning, gamma: torch.Tensor) -> Conditioning:
        """γ·C_opt + (1 − γ)·C_orig (E2PO Eq. 13), γ of shape (B,), applied to both tensors alike.

        Through :func:`trainer.sampler.blend_condition`: computed in at least float32 and rounded once to
        the condition's dtype, so an fp16/bf16 condition (SD3.5-M) is as exact as its dtype allows.
        """
        return Conditioning(
            blend_condition(c_opt.prompt_embeds, c_orig.prompt_embeds, gamma.view(-1, 1, 1)),
            blend_condition(c_opt.pooled, c_orig.pooled, gamma.view(-1, 1)),
        )


@contextlib.contextmanager
def token_embeddings_replaced(encoder: nn.Module, token_embeds: torch.Tensor) -> Iterator[None]:
    """Within the block, ``encoder``'s token lookup returns ``token_embeds`` (B, S, d) instead."""

    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        if output.shape != token_embeds.shape:
            raise ValueError(
                f"token embeddings {tuple(token_embeds.shape)} do not match lookup {tuple(output.shape)}"
            )
        return token_embeds.to(output.dtype)

    handle = encoder.text_model.embeddings.token_embedding.register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


class SD3TextEncoder:
    """Frozen SD3 text encoders (CLIP-L, CLIP-G, optional T5) producing pipeline-identical conditioning."""

    def __init__(
        self,
        *,
        tokenizer,
        text_encoder: nn.Module,
        tokenizer_2,
        text_encoder_2: nn.Module,
        joint_attention_dim: int,
        tokenizer_3=None,
        text_encoder_3: nn.Module | None = None,
        max_sequence_length: int = 256,
    ) -> None:
        self.tokenizer, self.text_encoder = tokenizer, text_encoder
        self.tokenizer_2, self.text_encoder_2 = tokenizer_2, text_encoder_2
        self.tokenizer_3, self.text_encoder_3 = tokenizer_3, text_encoder_3
        self.joint_attention_dim = joint_attention_dim
        self.max_sequence_length = max_sequence_length
        for encoder in (text_encoder, text_encoder_2, text_encoder_3):
            if encoder is not None:
                encoder.requires_grad_(False)
                encoder.eval()

    @property
    def device(self) -> torch.device:
        return next(self.text_encoder.parameters()).device

    # -- CLIP-L: the perturbed encoder ---------------------------------------------------------------

    def clip_l_ids(self, prompts: Sequence[str]) -> torch.Tensor:
        """(B, S) CLIP-L input ids (S = 77 for SD3), padded and truncated as the pipeline does."""
        return self._clip_ids(self.tokenizer, prompts)

    def clip_l_token_embeddings(self, input_ids: torch.Tensor) -> torch.Tensor:
        """E: the CLIP-L token-embedding lookup (before position embeddings), (B, S, d)."""
        return self.text_encoder.text_model.embeddings.token_embedding(input_ids.to(self.device))

    def clip_l_pooled(self, input_ids: torch.Tensor, token_embeds: torch.Tensor) -> torch.Tensor:
        """CLIP-L projected pooled embedding (``text_embeds``) from given token embeddings; differentiable."""
        with token_embeddings_replaced(self.text_encoder, token_embeds):
            return self.text_encoder(input_ids.to(self.device)).text_embeds

    # -- full conditioning --------------------------------------------------------------------------

    @torch.no_grad()
    def encode(
        self,
        prompts: Sequence[str],
        *,
        clip_l_token_embeds: torch.Tensor | None = None,
        dtype: torch.dtype | None = None,
    ) -> Conditioning:
        """The SD3 conditioning of ``prompts``; with ``clip_l_token_embeds`` (B, S, d), CLIP-L is fed
        those token embeddings instead of its own lookup (CLIP-G and T5 are never perturbed)."""
        prompts = list(prompts)
        ids_l = self.clip_l_ids(prompts)
        if clip_l_token_embeds is None:
            out_l = self.text_encoder(ids_l.to(self.device), output_hidden_states=True)
        else:
            with token_embeddings_replaced(self.text_encoder, clip_l_token_embeds):
                out_l = self.text_encoder(ids_l.to(self.device), output_hidden_states=True)
        ids_g = self._clip_ids(self.tokenizer_2, prompts)
        out_g = self.text_encoder_2(ids_g.to(self.device), output_hidden_states=True)
        dtype = dtype or out_l.hidden_states[-2].dtype
        clip_embeds = torch.cat([out_l.hidden_states[-2], out_g.hidden_states[-2]], dim=-1).to(dtype)
        clip_embeds = F.pad(clip_embeds, (0, self.joint_attention_dim - clip_embeds.shape[-1]))
        t5 = self._t5_embeds(prompts, dtype)
        prompt_embeds = torch.cat([clip_embeds, t5], dim=-2)
        pooled = torch.cat([out_l.text_embeds, out_g.text_embeds], dim=-1).to(dtype)
        return Conditioning(prompt_embeds, pooled)

    def _clip_ids(self, tokenizer, prompts: Sequence[str]) -> torch.Tensor:
        return tokenizer(
            list(prompts),
            padding="max_length",
            max_length=tokenizer.model_max_length,  # the pipeline's own length (77 for SD3)
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def _t5_embeds(self, prompts: list[str], dtype: torch.dtype) -> torch.Tensor:
        if self.text_encoder_3 is None:
            return torch.zeros(
                len(prompts),
                self.max_sequence_length,
                self.joint_attention_dim,
                device=self.device,
                dtype=dtype,
            )
        ids = self.tokenizer_3(
            prompts,
            padding="max_length",
            max_length=self.max_sequence_length,
            truncation=True,
            add_special_tokens=True,
            return_tensors="pt",
        ).input_ids
        device = next(self.text_encoder_3.parameters()).device
        return self.text_encoder_3(ids.to(device))[0].to(self.device, dtype)
