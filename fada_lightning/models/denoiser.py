"""The dual-UNet avatar denoiser of SPEC section 4 (after Loopy / Hallo).

One call contract for every network, teacher or student:

    pred = net(z_t, t, cond)        z_t (B, F, C, h, w), t (B,), cond: Conditions -> (B, F, C, h, w)

Reference net: a diffusers UNet2DConditionModel run at t = 0 on the reference latent and the
M motion latents, (B (1+M), C, h, w). Its self-attention inputs and transformer outputs are
kept in a bank, keyed by the layer's name.
Denoising net: a UNet2DConditionModel of the same shape over the B F frames, where each
transformer block does
    spatial self-attention, K/V = [own tokens ; reference-image tokens of the same layer]
 -> audio cross-attention (encoder_hidden_states = the frame's audio tokens)
 -> temporal self-attention over frames, K/V = [motion-frame features ; the F frames].
The bank depends only on (r, m), so a sampler computes it once per clip (`encode_reference`)
and reuses it at every step.
A student distilled from multi-CFG may also take the guidance scales it imitates
(`cfg_conditioning`, models/cfg.py): then `cond.guidance` (B, 2) is required.
"""
from __future__ import annotations

from pathlib import Path

import torch
from diffusers import ConfigMixin, ModelMixin, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from diffusers.models.embeddings import SinusoidalPositionalEmbedding
from diffusers.utils import is_accelerate_available
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..diffusion.guidance import Conditions
from .cfg import (SCALE_EMBEDDING_DIM, AudioThenCFGProcessor, CFGLayer, CFGTokens, ScaleTokens,
                  check_cfg_conditioning, scale_embedding)

Bank = dict[str, torch.Tensor]


class _Context:
    """Per-forward state the hooked layers share: the reference bank (with CFG layers, also their
    token side) and the frame count."""

    def __init__(self):
        self.bank: Bank = {}
        self.num_frames = 1


class RecordingAttnProcessor(AttnProcessor2_0):
    """Reference net attn1: store the (normed) tokens (N, hw, C), then attend as usual."""

    def __init__(self, ctx: _Context, name: str):
        super().__init__()
        self.ctx, self.name = ctx, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        self.ctx.bank[self.name] = hidden_states
        return super().__call__(attn, hidden_states, encoder_hidden_states, *args, **kwargs)


class ReferenceAttnProcessor(AttnProcessor2_0):
    """Denoising net attn1: K/V = [own tokens ; reference-image tokens of the same layer]."""

    def __init__(self, ctx: _Context, name: str):
        super().__init__()
        self.ctx, self.name = ctx, name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, *args, **kwargs):
        frames = self.ctx.num_frames
        ref = self.ctx.bank[self.name]  # (B (1+M), hw, C)
        b = hidden_states.shape[0] // frames
        ref = ref.unflatten(0, (b, -1))[:, 0]  # the reference image: (B, hw, C)
        kv = torch.cat([hidden_states, ref.repeat_interleave(frames, dim=0)], dim=1)
        return super().__call__(attn, hidden_states, kv, *args, **kwargs)


class TemporalAttention(nn.Module):
    """Self-attention over time at each spatial position, motion frames prepended as K/V.

    x (B F, C, H, W), motion (B, M, C, H, W) -> (B F, C, H, W). Zero-initialised output,
    so a fresh layer is the identity (and a pretrained image UNet is unchanged by it).
    """

    def __init__(self, channels: int, heads: int, max_frames: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels)
        self.pos = SinusoidalPositionalEmbedding(channels, max_frames)
        self.attn = Attention(query_dim=channels, heads=heads, dim_head=channels // heads, out_bias=True)
        nn.init.zeros_(self.attn.to_out[0].weight)
        nn.init.zeros_(self.attn.to_out[0].bias)

    def forward(self, x: torch.Tensor, motion: torch.Tensor, num_frames: int) -> torch.Tensor:
        bf, c, h, w = x.shape
        b, m = bf // num_frames, motion.shape[1]
        frames = x.reshape(b, num_frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, num_frames, c)
        past = motion.reshape(b, m, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, m, c)
        seq = self.pos(self.norm(torch.cat([past, frames], dim=1)))  # (B hw, M+F, C)
        frames = frames + self.attn(seq[:, m:], encoder_hidden_states=seq)
        return frames.reshape(b, h * w, num_frames, c).permute(0, 2, 3, 1).reshape(bf, c, h, w)


class _CheckpointedSlot(nn.Module):
    """A transformer slot that can recompute its activations in backward (activation checkpointing).

    Its layers read and write the shared context (bank, frame count), which later forwards replace,
    so a recomputation runs in the context of the original forward, captured when it ran, and
    writes into a copy of its bank (the first run's entries are the ones the graph holds)."""

    checkpointing = False

    def forward(self, hidden_states, *args, **kwargs):
        if not (self.checkpointing and torch.is_grad_enabled()):
            return self.run(hidden_states, *args, **kwargs)
        bank, frames = self.ctx.bank, self.ctx.num_frames
        runs = 0

        def run_in_context(*args, **kwargs):
            nonlocal runs
            runs += 1
            outer = self.ctx.bank, self.ctx.num_frames
            self.ctx.bank, self.ctx.num_frames = (bank if runs == 1 else dict(bank)), frames
            try:
                return self.run(*args, **kwargs)
            finally:
                self.ctx.bank, self.ctx.num_frames = outer

        return checkpoint(run_in_context, hidden_states, *args, use_reentrant=False, **kwargs)


class RecordingTransformer(_CheckpointedSlot):
    """Reference net: a Transformer2DModel whose output (N, C, H, W) is stored in the bank."""

    def __init__(self, transformer: nn.Module, ctx: _Context, name: str):
        super().__init__()
        self.transformer, self.ctx, self.name = transformer, ctx, name

    def run(self, hidden_states, *args, **kwargs):
        out = self.transformer(hidden_states, *args, **kwargs)[0]
        self.ctx.bank[self.name] = out
        return (out,)


class MotionTransformer(_CheckpointedSlot):
    """Denoising net: a Transformer2DModel followed by temporal attention with motion frames."""

    def __init__(self, transformer: nn.Module, ctx: _Context, name: str, heads: int, max_frames: int):
        super().__init__()
        self.transformer, self.ctx, self.name = transformer, ctx, name
        self.temporal = TemporalAttention(transformer.config.in_channels, heads, max_frames)

    def run(self, hidden_states, *args, **kwargs):
        out = self.transformer(hidden_states, *args, **kwargs)[0]
        feats = self.ctx.bank[self.name]  # (B (1+M), C, H, W): [reference, motion frames]
        b = out.shape[0] // self.ctx.num_frames
        motion = feats.unflatten(0, (b, -1))[:, 1:]
        return (self.temporal(out, motion, self.ctx.num_frames),)


def _transformer_slots(unet: UNet2DConditionModel):
    """(name, ModuleList, index) of every Transformer2DModel in the UNet's blocks, in order."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(unet.down_blocks)]
    blocks += [("mid_block", unet.mid_block)] + [(f"up_blocks.{i}", b) for i, b in enumerate(unet.up_blocks)]
    for prefix, block in blocks:
        for j, _ in enumerate(getattr(block, "attentions", None) or []):
            yield f"{prefix}.attentions.{j}", block.attentions, j


def _self_attentions(unet: UNet2DConditionModel):
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith("attn1")]


def _audio_attentions(unet: UNet2DConditionModel):
    return [(n, m) for n, m in unet.named_modules() if isinstance(m, Attention) and n.endswith("attn2")]


class AudioProjection(nn.Module):
    """Audio feature windows (B, F, W, L, D) -> audio tokens (B F, W, cross_dim): all L layers
    of each window position are projected to one token, plus a learned position per token."""

    def __init__(self, layers: int, dim: int, window: int, cross_dim: int, hidden: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(layers * dim, hidden), nn.SiLU(), nn.Linear(hidden, cross_dim))
        self.position = nn.Parameter(torch.zeros(window, cross_dim))
        self.norm = nn.LayerNorm(cross_dim)
        self.window, self.in_dim = window, layers * dim

    def forward(self, audio: torch.Tensor) -> torch.Tensor:
        b, f, w = audio.shape[:3]
        if w != self.window or audio[0, 0, 0].numel() != self.in_dim:
            raise ValueError(
                f"audio features {tuple(audio.shape[2:])} do not match the model's audio config "
                f"(window {self.window}, layers x dim = {self.in_dim}); check data.audio_features against model.net.audio"
            )
        tokens = self.proj(audio.reshape(b * f, w, self.in_dim)) + self.position
        return self.norm(tokens)


class AvatarDenoiser(ModelMixin, ConfigMixin):
    """Reference net + denoising net + audio projection; see the module docstring.

    unet:  UNet2DConditionModel config (both nets share it; `cross_attention_dim` = audio token size)
    audio: {"layers": L, "dim": D, "window": W, "hidden": projection width}
    pretrained: a local diffusers folder whose `unet/` initialises both nets (SD1.5 for `sd15`).
    cfg_conditioning: how a one-pass student is told its CFG scales, one of models.cfg.CFG_CONDITIONING
    ("none" for a teacher); cfg_tokens: N, the tokens per set of the CFG embedding.
    A diffusers model: `save_pretrained` writes its config and every weight (both UNets, the audio
    projection, the CFG parts) to one safetensors file, and `from_pretrained` rebuilds it (`fada export`).
    Its config leaves out `pretrained`, a path on the training machine whose weights the file replaces.
    """

    ignore_for_config = ["pretrained"]

    @register_to_config
    def __init__(self, unet: dict, audio: dict, temporal_heads: int = 8, max_frames: int = 32,
                 pretrained: str | None = None, cfg_conditioning: str = "none", cfg_tokens: int = 4):
        super().__init__()
        self.reference_net = self._load_unet(unet, pretrained)
        self.denoising_net = self._load_unet(unet, pretrained)
        cross_dim = self.denoising_net.config.cross_attention_dim
        self.audio_projection = AudioProjection(audio["layers"], audio["dim"], audio["window"], cross_dim,
                                                audio.get("hidden", cross_dim))
        self.max_frames = max_frames
        self._drop_unused_reference_layers()
        self._ref_ctx, self._ctx = _Context(), _Context()
        for name, attn in _self_attentions(self.reference_net):
            attn.set_processor(RecordingAttnProcessor(self._ref_ctx, name))
        for name, attn in _self_attentions(self.denoising_net):
            attn.set_processor(ReferenceAttnProcessor(self._ctx, name))
        for name, slots, j in _transformer_slots(self.reference_net):
            slots[j] = RecordingTransformer(slots[j], self._ref_ctx, name)
        for name, slots, j in _transformer_slots(self.denoising_net):
            slots[j] = MotionTransformer(slots[j], self._ctx, name, temporal_heads, max_frames)
        self.cfg_conditioning = check_cfg_conditioning(cfg_conditioning)
        self._cfg_processors: list[AudioThenCFGProcessor] = []  # plain list: each is registered under its attn2
        self._add_cfg_conditioning(cfg_tokens, cross_dim)

    def _add_cfg_conditioning(self, num_tokens: int, dim: int):
        """The parts of models/cfg.py that `cfg_conditioning` names, all zero at the start."""
        if self.cfg_conditioning == "time_embedding":
            time_embedding = self.denoising_net.time_embedding
            time_embedding.cond_proj = nn.Linear(2 * SCALE_EMBEDDING_DIM, time_embedding.linear_1.in_features, bias=False)
            nn.init.zeros_(time_embedding.cond_proj.weight)
            self.denoising_net.register_to_config(time_cond_proj_dim=2 * SCALE_EMBEDDING_DIM)
        elif self.cfg_conditioning in ("layer", "layer_tokens"):
            self.cfg_embedding = (CFGTokens if self.cfg_conditioning == "layer_tokens" else ScaleTokens)(num_tokens, dim)
            for name, attn in _audio_attentions(self.denoising_net):
                layer = CFGLayer(attn.to_q.in_features, attn.heads, dim)
                attn.set_processor(AudioThenCFGProcessor(self._ctx, layer, f"cfg:{name}"))
                self._cfg_processors.append(attn.processor)

    def set_activation_checkpointing(self, enabled: bool = True) -> "AvatarDenoiser":
        """Recompute every transformer slot's activations (spatial, audio, temporal and CFG attention,
        the bulk of activation memory) in backward instead of keeping them: less memory, ~1/3 more compute."""
        for module in self.modules():
            if isinstance(module, _CheckpointedSlot):
                module.checkpointing = enabled
        return self

    def sharding_units(self) -> list[nn.Module]:
        """The pieces FSDP gathers one at a time (fada_lightning/strategies.py): every block of both
        UNets; what is left (embeddings, conv in/out, audio projection) goes with the whole network."""
        return [block for unet in (self.reference_net, self.denoising_net)
                for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks) if block is not None]

    @property
    def takes_guidance(self) -> bool:
        """True when the network reads the CFG scales it imitates from `cond.guidance`."""
        return self.cfg_conditioning != "none"

    def _drop_unused_reference_layers(self):
        """Only the reference net's bank is used: drop what runs after its last transformer
        (later up blocks, that block's upsampler, the output head), so DDP sees no unused weights."""
        ref = self.reference_net
        last = max(i for i, block in enumerate(ref.up_blocks) if getattr(block, "attentions", None))
        ref.up_blocks = ref.up_blocks[: last + 1]
        ref.up_blocks[-1].upsamplers = None
        ref.conv_norm_out, ref.conv_out = None, nn.Identity()

    @staticmethod
    def _load_unet(config: dict, pretrained: str | None) -> UNet2DConditionModel:
        if pretrained is None:
            return UNet2DConditionModel(**config)
        folder = Path(pretrained).expanduser()
        if not folder.is_dir():
            raise FileNotFoundError(f"pretrained UNet folder {folder} does not exist (a local diffusers folder)")
        sub = "unet" if (folder / "unet").is_dir() else None
        return UNet2DConditionModel.from_pretrained(folder, subfolder=sub, local_files_only=True,
                                                    low_cpu_mem_usage=is_accelerate_available())

    def encode_reference(self, cond: Conditions) -> Bank:
        """Run the reference net on [r ; m] at t = 0 -> the bank for `forward(reference=...)`; with
        CFG layers also the token side of each for cond.guidance (it does not change over the steps).
        A sampler's entry point (FSDP gathers the weights for it as for forward, see strategies.py)."""
        return self._reference_bank(cond)

    def _reference_bank(self, cond: Conditions) -> Bank:
        images = torch.cat([cond.ref[:, None], cond.motion], dim=1).flatten(0, 1)  # (B (1+M), C, h, w)
        null_text = images.new_zeros(images.shape[0], 1, self.reference_net.config.cross_attention_dim)
        self._ref_ctx.bank = {}
        self.reference_net(images, 0, encoder_hidden_states=null_text)
        bank, self._ref_ctx.bank = self._ref_ctx.bank, {}
        if self._cfg_processors:
            tokens = self.cfg_embedding(self._guidance(cond))  # e_cfg (B, N, d)
            for processor in self._cfg_processors:
                bank.update(processor.fold(tokens))
        return bank

    def _guidance(self, cond: Conditions) -> torch.Tensor:
        if cond.guidance is None:
            raise ValueError(f"this network takes the CFG scales it imitates (cfg_conditioning "
                             f"{self.cfg_conditioning!r}): cond.guidance (B, 2) = (s_r, s_a) is missing")
        return cond.guidance.float()

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, cond: Conditions,
                reference: Bank | None = None) -> torch.Tensor:
        b, f, c, h, w = sample.shape
        if f + cond.motion.shape[1] > self.max_frames:
            raise ValueError(f"{f} frames + {cond.motion.shape[1]} motion frames exceed max_frames={self.max_frames}")
        bank = self._reference_bank(cond) if reference is None else reference  # not the FSDP-hooked entry point
        timestep = torch.as_tensor(timestep, device=sample.device).expand(b).repeat_interleave(f)
        timestep_cond = None
        if self.cfg_conditioning == "time_embedding":
            timestep_cond = scale_embedding(self._guidance(cond)).repeat_interleave(f, dim=0)  # (B F, 2 E)
            timestep_cond = timestep_cond.to(self.denoising_net.dtype)
        self._ctx.bank, self._ctx.num_frames = bank, f
        try:
            out = self.denoising_net(sample.flatten(0, 1), timestep, timestep_cond=timestep_cond,
                                     encoder_hidden_states=self.audio_projection(cond.audio)).sample
        finally:
            self._ctx.bank = {}
        return out.unflatten(0, (b, f))
