"""Multi-CFG conditioning of a one-pass student (SPEC section 3, Eq 10) and its ablation variants.

The student is told the guidance scales g = (s_r, s_a) it should imitate (`cond.guidance`, (B, 2)):

  none            nothing: the student cannot see the scales
  time_embedding  a sinusoidal embedding of each scale (LCM's w-condition) added to the UNet's time
                  embedding through diffusers' `cond_proj` (`time_cond_proj_dim`), zero-initialised
  layer           a CFG layer after every audio-attention layer, attending to N tokens that an MLP
                  makes from the scales' embedding
  layer_tokens    the CFG layer attending to FADA's learnable tokens combined like Eq 9:
                  e_cfg = T_0 + s_r (T_r - T_0) + s_a (T_ar - T_r)                         (Eq 10)

Every part starts at zero output, so a fresh student computes exactly what the teacher it is
copied from computes.
"""
from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import TimestepEmbedding, get_timestep_embedding
from torch import nn

CFG_CONDITIONING = ("none", "time_embedding", "layer", "layer_tokens")
SCALE_EMBEDDING_DIM = 128  # per scale; the pair makes 256, LCM's w-embedding size


def check_cfg_conditioning(kind: str) -> str:
    if kind not in CFG_CONDITIONING:
        raise ValueError(f"cfg_conditioning must be one of {CFG_CONDITIONING}, got {kind!r}")
    return kind


def scale_embedding(guidance: torch.Tensor, dim: int = SCALE_EMBEDDING_DIM) -> torch.Tensor:
    """(B, 2) scales -> (B, 2 dim): each scale's sinusoidal embedding at 1000 s (as LCM embeds w)."""
    return torch.cat([get_timestep_embedding(guidance[:, i] * 1000, dim) for i in range(guidance.shape[1])], dim=1)


class CFGTokens(nn.Module):
    """Eq 10: three learnable token sets T_0, T_r, T_ar (N, d) -> e_cfg (B, N, d) for scales (B, 2).
    At (s_r, s_a) = (0, 0) it is T_0, at (1, 0) T_r, at (1, 1) T_ar, like Eq 9's three passes."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.uncond, self.ref, self.full = (nn.Parameter(torch.randn(num_tokens, dim) * dim**-0.5) for _ in range(3))

    def forward(self, guidance: torch.Tensor) -> torch.Tensor:
        s_r, s_a = guidance[:, 0, None, None], guidance[:, 1, None, None]
        tokens = self.uncond + s_r * (self.ref - self.uncond) + s_a * (self.full - self.ref)
        return tokens.to(self.uncond.dtype)  # float32 scales, the tokens' dtype out (bf16 weights too)


class ScaleTokens(nn.Module):
    """The `layer` variant's embedding: scales (B, 2) -> (B, N, d) through an MLP of their
    sinusoidal embedding, with no Eq 9 structure."""

    def __init__(self, num_tokens: int, dim: int):
        super().__init__()
        self.num_tokens, self.dim = num_tokens, dim
        self.mlp = TimestepEmbedding(2 * SCALE_EMBEDDING_DIM, dim, out_dim=num_tokens * dim)

    def forward(self, guidance: torch.Tensor) -> torch.Tensor:
        embedding = scale_embedding(guidance).to(self.mlp.linear_1.weight.dtype)
        return self.mlp(embedding).unflatten(-1, (self.num_tokens, self.dim))


class CFGLayer(nn.Module):
    """Cross-attention from image tokens to the CFG embedding, pre-normed, zero-initialised output
    (a fresh layer adds nothing). x (B F, L, C) attends to tokens (B, T, d), given as `fold(tokens)`,
    -> (B F, L, C); the F frames of a clip share its tokens, so their queries attend as one (B, F L)
    sequence.

    With T tokens the projections fold onto the token side: per head h,
        softmax(x W_q,h k_h^T / sqrt(c)) v_h W_o,h = softmax(x A_h) V_h,  A_h = W_q,h k_h^T / sqrt(c) (C, T),
                                                                           V_h = v_h W_o,h (T, C)
    so the image side is x (C) -> h T logits -> C, instead of two C x C projections: ~C / (h T) times
    fewer flops, and the same parameters (to_q, to_kv, to_out) as an ordinary attention layer. The
    token side (`fold`) does not depend on x: a sampler computes it once per clip window."""

    def __init__(self, channels: int, heads: int, dim: int):
        super().__init__()
        if channels % heads:
            raise ValueError(f"CFG layer: {channels} channels do not split into {heads} heads")
        self.heads = heads
        self.norm = nn.LayerNorm(channels)
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_kv = nn.Linear(dim, 2 * channels, bias=False)
        self.to_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.to_out.weight)
        nn.init.zeros_(self.to_out.bias)

    def fold(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T, d) -> (A (B, C, h T), V (B, h T, C)): everything that does not depend on x,
        computed once per clip window when sampling (it rides in the reference bank)."""
        (b, t, _), h, channels = tokens.shape, self.heads, self.to_q.in_features
        c = channels // h
        k, v = self.to_kv(tokens).view(b, t, 2, h, c).unbind(2)  # (B, T, h, c) each
        a = torch.einsum("hci,bthc->biht", self.to_q.weight.view(h, c, channels), k * c**-0.5)
        values = torch.einsum("bthc,ohc->bhto", v, self.to_out.weight.view(channels, h, c))
        return a.reshape(b, channels, h * t), values.reshape(b, h * t, channels)

    def forward(self, x: torch.Tensor, folded: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x (B F, L, C) and `fold(tokens)` -> (B F, L, C)."""
        a, values = folded
        b, channels, _ = a.shape
        logits = self.norm(x).reshape(b, -1, channels) @ a  # (B, F L, h T)
        weights = logits.unflatten(-1, (self.heads, -1)).softmax(-1).flatten(2)
        return torch.baddbmm(self.to_out.bias, weights, values).reshape(x.shape)


class AudioThenCFGProcessor(nn.Module):
    """attn2 (the audio cross-attention) of a denoising-net block, followed by a CFG layer:
        a = audio_attention(x);  return a + cfg_layer(x + a, e_cfg)
    which the block adds to its residual stream. x is the block's normed input; the CFG layer's
    token side (`CFGLayer.fold` of e_cfg) comes from the reference bank under `bank_key`.
    A module: its layer's weights are attn2.processor.cfg_layer.*."""

    def __init__(self, ctx, layer: CFGLayer, bank_key: str):
        super().__init__()
        self.ctx, self.cfg_layer, self.bank_key, self.audio = ctx, layer, bank_key, AttnProcessor2_0()

    def fold(self, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """The bank entries of this layer's token side for e_cfg (B, N, d)."""
        a, values = self.cfg_layer.fold(tokens)
        return {f"{self.bank_key}.a": a, f"{self.bank_key}.values": values}

    def forward(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        audio = self.audio(attn, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        folded = self.ctx.bank[f"{self.bank_key}.a"], self.ctx.bank[f"{self.bank_key}.values"]
        return audio + self.cfg_layer(hidden_states + audio, folded)
