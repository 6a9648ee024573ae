"""Embedding-perturbed exploration: optimise K − 1 token-embedding perturbations per prompt (E2PO §4).

For each prompt, E ∈ R^{S×d} is the CLIP-L token-embedding lookup (before position embeddings) and
I ⊂ {0..S−1} its content positions (no [SOS], [EOS] or padding). The M = K − 1 perturbations
δ_k ∈ R^{S×d} are zero outside I and minimise, through the frozen text encoder f_φ and its pooled
projected embedding e = Pool(f_φ(·)):

    L_emb = λ_div · L_div + L_anc
    L_div = mean_{i≠j} cos(e_i, e_j)                                  (spread the variants apart)
    L_anc = Σ_k max(0, |cos(e_k, e_anc) − μ| − ε),  e_anc = Pool(f_φ(E))  (stay near the prompt's meaning)

with Adam for T_emb steps and a max-norm projection of δ after every step (REFERENCE §3, paper Table 3).

Shapes used throughout: P prompts, M = K − 1 variants per prompt, S tokens (77 for CLIP), d the
token-embedding width, d_pool the pooled width. The text encoder is reached only through
``embed_fn``, which the caller builds (transformers' ``CLIPTextModel`` takes no ``inputs_embeds``, so
the caller replaces the output of ``text_model.embeddings.token_embedding`` with a forward hook).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from trainer.validation import check, check_literals, positive

if TYPE_CHECKING:
    from trainer.text import Conditioning, SD3TextEncoder

EmbedFn = Callable[[Tensor], Tensor]
"""``embed_fn(token_embeds: (B, S, d)) -> pooled: (B, d_pool)``: the frozen text encoder run on the given
token embeddings (position embeddings are added inside, after the lookup). It must be differentiable with
respect to its input. Rows come prompt-major, ``R`` rows per prompt with B = P·R: R = 1 for the anchor
(row p is prompt p) and R = M for the variants (row p·M + k is variant k of prompt p), so the caller
recovers each row's input ids with ``input_ids.repeat_interleave(B // P, dim=0)``."""


@dataclass(kw_only=True)
class PerturbConfig:
    """The embedding-perturbed mechanism. Defaults are the paper's Table 3 unless marked **choice**."""

    num_steps: int = 300
    """T_emb: Adam steps per iteration (Table 3). 0 returns the initial draw, projected."""
    lr: float = 1e-3
    """Adam learning rate for δ (Table 3: embedding lr)."""
    init_std: float = 1e-4
    """σ_init: δ starts as N(0, σ_init²) at content positions (Table 3)."""
    max_norm: float = 0.05
    """Max-norm clip ||δ||_max (Table 3), applied after every Adam step; its meaning depends on
    ``max_norm_mode`` and ``norm_projection``."""
    max_norm_mode: Literal["absolute", "relative"] = "absolute"
    """``absolute``: the bound is ``max_norm`` in embedding units, calibrated for CLIP-L (the paper).
    ``relative``: the bound is ``max_norm`` × the mean L2 norm of the prompt's content-token embeddings,
    so the same setting means the same relative size for encoders whose embedding scale differs from
    CLIP-L's (the tiny shapes-world encoders)."""
    lambda_div: float = 50.0
    """λ_div: weight of the diversity term L_div (Table 3; the paper's ablation tried 30 / 50 / 100)."""
    anchor_mu: float = 0.8
    """μ: target cosine similarity between a variant's pooled embedding and the anchor's (Table 3)."""
    anchor_eps: float = 0.01
    """ε: half-width of the insensitive zone around μ in which L_anc is zero (Table 3)."""
    norm_projection: Literal["per_token", "global"] = "per_token"
    """**choice**: ``per_token`` bounds the L2 norm of every token's δ (the reading of "Max Norm Clip
    ||δ||max" in REFERENCE §3); ``global`` bounds the Frobenius norm of each variant's whole δ_k."""
    pool: Literal["eos"] = "eos"
    """**choice**: which pooled embedding ``embed_fn`` must return — ``eos`` = the projected hidden state at
    the first [EOS] token (CLIP's ``text_embeds``; the paper leaves Pool ambiguous). Read by the caller
    that builds ``embed_fn``; this module only consumes the pooled vectors."""

    def __post_init__(self) -> None:
        check_literals("perturb", self)
        positive("perturb", self, "num_steps", "init_std", "anchor_eps", strict=False)
        positive("perturb", self, "lr", "max_norm")
        positive("perturb", self, "lambda_div", strict=False)
        check("perturb", "anchor_mu", self.anchor_mu, -1 <= self.anchor_mu <= 1, "a cosine in [-1, 1]")


@dataclass(kw_only=True)
class PerturbResult:
    """Optimised perturbations of one iteration and what they achieved (all tensors detached)."""

    deltas: Tensor
    """(P, M, S, d) final projected δ, exactly zero outside the content positions; float32 (float64 when
    the embeddings are float64), the precision it was optimised in."""
    perturbed_embeds: Tensor
    """(P, M, S, d) Ẽ_k = E + δ_k in the token embeddings' dtype: what the caller feeds CLIP-L."""
    cos_to_anchor: Tensor
    """(P, M) cos(e_k, e_anc) of the returned δ."""
    loss_div: Tensor
    """(P,) L_div of the returned δ (0 when M < 2)."""
    loss_anc: Tensor
    """(P,) L_anc of the returned δ."""
    delta_norm: Tensor
    """(P, M, S) L2 norm of each token's δ (zero outside the content positions)."""
    mask: Tensor
    """(P, S) the content positions the δ live on."""
    token_norm: Tensor
    """(P,) mean L2 norm of each prompt's content-token embeddings (the unit of a relative bound)."""
    bound: Tensor
    """(P,) the max-norm each prompt's δ was projected to (per token, or per variant for ``global``)."""
    loss_history: Tensor
    """(num_steps,) Σ_p L_emb before each Adam step (float32 on the encoder's device)."""
    lambda_div: float
    """λ_div the losses were weighted with, so ``stats`` can report L_emb."""

    @property
    def num_variants(self) -> int:
        return self.deltas.shape[1]

    def tokens_at_bound(self) -> float:
        """Share of the variants' content tokens whose δ norm is within 1 % of the prompt's bound: near 1
        when the norm ball, not the anchor band, is what holds the perturbation back (per-token bound)."""
        content = self.mask[:, None, :].expand_as(self.delta_norm)
        at_bound = self.delta_norm >= 0.99 * self.bound[:, None, None]
        return float(at_bound[content].float().mean()) if content.any() else 0.0

    def stats(self) -> dict[str, float]:
        """Scalars for the training log; {} when there were no variants (K = 1)."""
        if self.num_variants == 0 or self.deltas.shape[0] == 0:
            return {}
        token_mask = self.mask[:, None, :].expand_as(self.delta_norm)
        norms = self.delta_norm[token_mask]
        out = {
            "perturb/cos_anchor_mean": self.cos_to_anchor.mean().item(),
            "perturb/cos_anchor_min": self.cos_to_anchor.min().item(),
            "perturb/loss_anc": self.loss_anc.mean().item(),
            "perturb/loss_div": self.loss_div.mean().item(),
            "perturb/loss": (self.lambda_div * self.loss_div + self.loss_anc).mean().item(),
            "perturb/delta_norm_mean": norms.mean().item() if norms.numel() else 0.0,
            "perturb/delta_norm_max": norms.max().item() if norms.numel() else 0.0,
            "perturb/bound_mean": self.bound.mean().item(),
            "perturb/tokens_at_bound": self.tokens_at_bound(),
        }
        if self.num_variants >= 2:
            # L_div is itself the mean pairwise cosine among the variants
            out["perturb/pairwise_cos_mean"] = self.loss_div.mean().item()
        if self.loss_history.numel():
            out["perturb/loss_initial"] = self.loss_history[0].item() / self.deltas.shape[0]
        return out


def content_mask(input_ids: Tensor, *, bos_id: int, eos_id: int, pad_id: int | None) -> Tensor:
    """The index set I: which positions of each tokenised prompt carry content tokens.

    input_ids: (N, S) → (N, S) bool. Excluded: every [SOS] (``bos_id``); the first [EOS] and everything
    after it — CLIP tokenizers pad either with [EOS] itself (49407) or with "!" (id 0), so "after the
    first [EOS]" is the definition that holds for both; and any ``pad_id`` position (None = no pad id
    check). A prompt truncated to S tokens still ends in [EOS]; a sequence without any [EOS] counts
    everything that is not [SOS]/padding as content. An empty prompt has no content positions.
    """
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must be (N, S), got shape {tuple(input_ids.shape)}")
    at_or_after_eos = (input_ids == eos_id).cumsum(dim=1) > 0
    mask = ~at_or_after_eos & (input_ids != bos_id)
    if pad_id is not None:
        mask &= input_ids != pad_id
    return mask


def _cos_dtype(dtype: torch.dtype) -> torch.dtype:
    # cosines of near-identical vectors (cos ≈ 1 at the start) lose all resolution in half precision
    return torch.promote_types(dtype, torch.float32)


def diversity_loss(e: Tensor) -> Tensor:
    """L_div per prompt: the mean cosine over ordered pairs i ≠ j of the M variants' pooled embeddings.

    e: (P, M, d) → (P,), computed in float32 or wider. Zero when M < 2 (no pair exists). The mean over
    ordered pairs equals the mean over unordered pairs since cos is symmetric.
    """
    num_prompts, num_variants = e.shape[:2]
    if num_variants < 2:
        return e.new_zeros(num_prompts, dtype=_cos_dtype(e.dtype))
    unit = F.normalize(e.to(_cos_dtype(e.dtype)), dim=-1)
    gram = unit @ unit.transpose(1, 2)  # (P, M, M)
    off_diagonal = gram.sum(dim=(1, 2)) - gram.diagonal(dim1=1, dim2=2).sum(dim=-1)
    return off_diagonal / (num_variants * (num_variants - 1))


def anchor_loss(e: Tensor, e_anchor: Tensor, mu: float, eps: float) -> Tensor:
    """L_anc per prompt: Σ_k max(0, |cos(e_k, e_anc) − μ| − ε), zero inside the ε-insensitive zone.

    e: (P, M, d), e_anchor: (P, d) → (P,), computed in float32 or wider.
    """
    return _anchor_loss_from_cos(cosine_to_anchor(e, e_anchor), mu, eps)


def _anchor_loss_from_cos(cos: Tensor, mu: float, eps: float) -> Tensor:
    return torch.relu((cos - mu).abs() - eps).sum(dim=-1)


def cosine_to_anchor(e: Tensor, e_anchor: Tensor) -> Tensor:
    """cos(e_k, e_anc): e (P, M, d), e_anchor (P, d) → (P, M), in float32 or wider."""
    dtype = _cos_dtype(torch.promote_types(e.dtype, e_anchor.dtype))
    return F.cosine_similarity(e.to(dtype), e_anchor.to(dtype)[:, None, :], dim=-1)


def mean_token_norm(token_embeds: Tensor, mask: Tensor) -> Tensor:
    """token_embeds (P, S, d), mask (P, S) → (P,) the mean L2 norm of each prompt's content-token
    embeddings, float32 or wider (0 for a prompt without content tokens)."""
    token_norms = token_embeds.to(_cos_dtype(token_embeds.dtype)).norm(dim=-1) * mask
    return token_norms.sum(dim=-1) / mask.sum(dim=-1).clamp(min=1)


def resolve_max_norm(token_norm: Tensor, config: PerturbConfig) -> Tensor:
    """The max-norm bound of each prompt from its :func:`mean_token_norm` (P,) → (P,).

    ``absolute`` → ``config.max_norm`` for every prompt; ``relative`` → ``config.max_norm`` × the mean
    content-token norm (0 for a prompt without content tokens, where δ is zero anyway).
    """
    if config.max_norm_mode == "absolute":
        return torch.full_like(token_norm, config.max_norm)
    return config.max_norm * token_norm


@torch.no_grad()
def project_max_norm_(
    delta: Tensor,
    mask: Tensor,
    max_norm: Tensor | float,
    mode: Literal["per_token", "global"],
) -> Tensor:
    """Project δ in place onto the max-norm ball and zero it outside the content positions.

    delta: (P, M, S, d); mask: (P, S) bool; max_norm: (P,) tensor or a float. ``per_token`` rescales
    every token whose L2 norm exceeds the bound down to it; ``global`` does the same with the Frobenius
    norm of each variant's whole δ_k (over content positions). Entries within the bound are multiplied
    by exactly 1, so they are left bit-identical. Returns ``delta``.
    """
    num_prompts = delta.shape[0]
    bound = torch.as_tensor(max_norm, dtype=delta.dtype, device=delta.device).expand(num_prompts)
    delta.mul_(mask[:, None, :, None].to(delta.dtype))
    if mode == "per_token":
        norm = delta.norm(dim=-1)  # (P, M, S)
        bound = bound[:, None, None]
    elif mode == "global":
        norm = delta.flatten(2).norm(dim=-1)  # (P, M)
        bound = bound[:, None]
    else:
        raise ValueError(f"mode must be 'per_token' or 'global', got {mode!r}")
    scale = torch.where(norm > bound, bound / norm.clamp(min=torch.finfo(delta.dtype).tiny), 1.0)
    delta.mul_(scale.reshape(*scale.shape, *([1] * (delta.ndim - scale.ndim))))
    return delta


def sample_initial_deltas(
    mask: Tensor,
    num_variants: int,
    dim: int,
    init_std: float,
    generator: torch.Generator,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> Tensor:
    """δ at step 0: N(0, σ_init²) at content positions, zero elsewhere. mask (P, S) → (P, M, S, d).

    Drawn on the generator's device and then moved, so a seed gives the same δ on every device.
    """
    num_prompts, seq_len = mask.shape
    noise = torch.randn(
        (num_prompts, num_variants, seq_len, dim), generator=generator, device=generator.device, dtype=dtype
    )
    noise = noise.to(device if device is not None else mask.device)
    return noise * init_std * mask[:, None, :, None].to(noise.dtype)


def embedding_objective(
    embed_fn: EmbedFn,
    token_embeds: Tensor,
    mask: Tensor,
    deltas: Tensor,
    e_anchor: Tensor,
    config: PerturbConfig,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """L_emb per prompt for the given δ, differentiable w.r.t. ``deltas``.

    token_embeds (P, S, d), mask (P, S), deltas (P, M, S, d), e_anchor (P, d_pool) →
    (L_emb (P,), L_div (P,), L_anc (P,), cos_to_anchor (P, M)). δ is masked here too, so positions
    outside I receive exactly zero gradient whatever the encoder does with them.
    """
    num_prompts, num_variants, seq_len, dim = deltas.shape
    masked = deltas * mask[:, None, :, None].to(deltas.dtype)
    perturbed = (token_embeds[:, None].to(deltas.dtype) + masked).to(token_embeds.dtype)
    pooled = embed_fn(perturbed.reshape(num_prompts * num_variants, seq_len, dim))
    pooled = pooled.reshape(num_prompts, num_variants, -1)
    loss_div = diversity_loss(pooled)
    cos = cosine_to_anchor(pooled, e_anchor)
    loss_anc = _anchor_loss_from_cos(cos, config.anchor_mu, config.anchor_eps)
    return config.lambda_div * loss_div + loss_anc, loss_div, loss_anc, cos


def optimize_perturbations(
    embed_fn: EmbedFn,
    token_embeds: Tensor,
    mask: Tensor,
    num_variants: int,
    config: PerturbConfig,
    generator: torch.Generator | None,
    *,
    init_deltas: Tensor | None = None,
) -> PerturbResult:
    """Optimise the M = ``num_variants`` perturbations of every prompt in one batched Adam run.

    token_embeds: (P, S, d) CLIP-L token-lookup output E (any float dtype, on the encoder's device);
    mask: (P, S) bool content positions I (see ``content_mask``); generator: draws the initial δ
    (ignored when ``init_deltas`` (P, M, S, d) is given). Returns a ``PerturbResult``.

    The paper loops over prompts; here all P·M variants go through ``embed_fn`` together and the
    per-prompt objectives are **summed** (not averaged): the δ of different prompts are disjoint
    parameters, so each prompt's δ receives exactly the gradient of its own L_emb, and Adam, being
    element-wise, then takes the same steps as P separate runs would.

    δ is kept in float32 (float64 if E is) whatever the encoder's dtype: Adam's ε and second moments
    underflow in half precision. The forward casts E + δ to E's dtype. A prompt without content
    positions (an empty prompt) keeps δ = 0: its variants equal the anchor. Runs under
    ``torch.enable_grad()`` (and outside inference mode), so it may be called from a no-grad rollout.
    Calls ``embed_fn`` 1 + ``num_steps`` + 1 times: anchor, every step, final statistics.
    """
    if token_embeds.ndim != 3:
        raise ValueError(f"token_embeds must be (P, S, d), got shape {tuple(token_embeds.shape)}")
    if mask.shape != token_embeds.shape[:2]:
        raise ValueError(f"mask must have shape {tuple(token_embeds.shape[:2])}, got {tuple(mask.shape)}")
    if num_variants < 0:
        raise ValueError(f"num_variants must be >= 0, got {num_variants}")
    num_prompts, seq_len, dim = token_embeds.shape
    device = token_embeds.device
    master_dtype = _cos_dtype(token_embeds.dtype)
    mask = mask.to(device=device, dtype=torch.bool)
    if init_deltas is not None and init_deltas.shape != (num_prompts, num_variants, seq_len, dim):
        raise ValueError(
            f"init_deltas must be {(num_prompts, num_variants, seq_len, dim)}, got {tuple(init_deltas.shape)}"
        )
    if init_deltas is None and generator is None and num_variants > 0:
        raise ValueError("either generator or init_deltas is required")

    with torch.inference_mode(False), torch.enable_grad():
        # a clone turns an inference-mode tensor into one autograd may save
        embeds = token_embeds.detach().clone()
        if init_deltas is not None:
            delta = init_deltas.detach().to(device=device, dtype=master_dtype).clone()
        elif num_variants > 0:
            assert generator is not None
            delta = sample_initial_deltas(
                mask, num_variants, dim, config.init_std, generator, dtype=master_dtype, device=device
            )
        else:
            delta = torch.zeros(num_prompts, 0, seq_len, dim, dtype=master_dtype, device=device)
        if num_variants == 0 or num_prompts == 0:
            return _empty_result(embeds, delta, mask, config)

        token_norm = mean_token_norm(embeds, mask)
        bound = resolve_max_norm(token_norm, config)
        project_max_norm_(delta, mask, bound, config.norm_projection)
        with torch.no_grad():
            e_anchor = embed_fn(embeds).detach()

        delta.requires_grad_(True)
        optimizer = torch.optim.Adam([delta], lr=config.lr)
        # kept on the device: reading each step's loss would synchronise every step
        loss_history = torch.zeros(config.num_steps, dtype=torch.float32, device=device)
        for step in range(config.num_steps):
            loss_emb, _, _, _ = embedding_objective(embed_fn, embeds, mask, delta, e_anchor, config)
            total = loss_emb.sum()
            optimizer.zero_grad(set_to_none=True)
            total.backward()
            optimizer.step()
            project_max_norm_(delta, mask, bound, config.norm_projection)
            loss_history[step] = total.detach()

        delta = delta.detach()
        with torch.no_grad():
            _, loss_div, loss_anc, cos = embedding_objective(embed_fn, embeds, mask, delta, e_anchor, config)
    return PerturbResult(
        deltas=delta,
        perturbed_embeds=(embeds[:, None].to(master_dtype) + delta).to(embeds.dtype),
        cos_to_anchor=cos.detach(),
        loss_div=loss_div.detach(),
        loss_anc=loss_anc.detach(),
        delta_norm=delta.norm(dim=-1),
        mask=mask,
        token_norm=token_norm,
        bound=bound,
        loss_history=loss_history,
        lambda_div=config.lambda_div,
    )


def _empty_result(embeds: Tensor, delta: Tensor, mask: Tensor, config: PerturbConfig) -> PerturbResult:
    """K = 1 (or no prompts): nothing to optimise and no encoder call."""
    num_prompts, num_variants = delta.shape[:2]
    zeros = embeds.new_zeros(num_prompts, dtype=delta.dtype)
    token_norm = mean_token_norm(embeds, mask)
    return PerturbResult(
        deltas=delta.detach(),
        perturbed_embeds=(embeds[:, None].to(delta.dtype) + delta).to(embeds.dtype).detach(),
        cos_to_anchor=embeds.new_zeros(num_prompts, num_variants, dtype=delta.dtype),
        loss_div=zeros,
        loss_anc=zeros.clone(),
        delta_norm=delta.detach().norm(dim=-1),
        mask=mask,
        token_norm=token_norm,
        bound=resolve_max_norm(token_norm, config),
        loss_history=embeds.new_zeros(0, dtype=torch.float32),
        lambda_div=config.lambda_div,
    )


def perturb_prompts(
    text: SD3TextEncoder,
    prompts: Sequence[str],
    num_variants: int,
    config: PerturbConfig,
    draw_init: Callable[[Tensor, int], Tensor],
) -> tuple[PerturbResult, Conditioning]:
    """Optimise ``num_variants`` CLIP-L perturbations of each prompt and encode them: (result, C_opt), C_opt
    flattened prompt-major (variant v of prompt p is row p·M + v).

    ``draw_init(mask, dim)`` returns the initial δ (P, M, S, d) for the content mask (P, S): the caller
    decides how the draws are keyed (per prompt in the trainer, one generator in ``trainer.sensitivity``).
    """
    ids = text.clip_l_ids(prompts)
    with torch.no_grad():
        token_embeds = text.clip_l_token_embeddings(ids)
    tok = text.tokenizer
    mask = content_mask(ids, bos_id=tok.bos_token_id, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    mask = mask.to(text.device)
    device_ids = ids.to(text.device)

    def embed_fn(batch: Tensor) -> Tensor:
        rows = device_ids.repeat_interleave(batch.shape[0] // len(prompts), dim=0)
        return text.clip_l_pooled(rows, batch)

    init = draw_init(mask, token_embeds.shape[-1])
    result = optimize_perturbations(
        embed_fn, token_embeds, mask, num_variants, config, None, init_deltas=init
    )
    flat = result.perturbed_embeds.reshape(-1, *result.perturbed_embeds.shape[2:])
    c_opt = text.encode([p for p in prompts for _ in range(num_variants)], clip_l_token_embeds=flat)
    return result, c_opt
