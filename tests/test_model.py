"""The dual-UNet denoiser: micro shapes and wiring on the CPU, sd15 on the meta device."""
import pytest
import torch
from diffusers import UNet2DConditionModel

from fada_lightning.diffusion.guidance import Conditions
from fada_lightning.models.codec import SpaceToDepthCodec, VAECodec
from fada_lightning.models.denoiser import AvatarDenoiser, TemporalAttention
from fada_lightning.presets import load_preset

MICRO = load_preset("micro")


def _micro_inputs(b=2, f=4, m=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    c, s = MICRO["net"]["unet"]["in_channels"], MICRO["net"]["unet"]["sample_size"]
    a = MICRO["net"]["audio"]
    cond = Conditions(ref=torch.randn(b, c, s, s, generator=g), motion=torch.randn(b, m, c, s, s, generator=g),
                      audio=torch.randn(b, f, a["window"], a["layers"], a["dim"], generator=g))
    return torch.randn(b, f, c, s, s, generator=g), torch.tensor([10, 900][:b]), cond


@pytest.fixture(scope="module")
def micro_net():
    torch.manual_seed(0)
    net = AvatarDenoiser(**MICRO["net"]).eval()
    for module in net.modules():  # give the zero-initialised temporal outputs weight, so motion matters
        if isinstance(module, TemporalAttention):
            torch.nn.init.normal_(module.attn.to_out[0].weight, std=0.02)
    return net


def test_micro_forward_shape_and_every_parameter_trains(micro_net):
    z, t, cond = _micro_inputs()
    out = micro_net(z, t, cond)
    assert out.shape == z.shape
    out.square().mean().backward()
    assert [n for n, p in micro_net.named_parameters() if p.grad is None] == []
    micro_net.zero_grad(set_to_none=True)


@torch.no_grad()
def test_every_condition_reaches_the_output(micro_net):
    z, t, cond = _micro_inputs()
    base = micro_net(z, t, cond)
    for field in ("ref", "motion", "audio"):
        changed = Conditions(**{**cond.__dict__, field: torch.zeros_like(getattr(cond, field))})
        assert not torch.allclose(micro_net(z, t, changed), base, atol=1e-5), field


@torch.no_grad()
def test_cached_reference_bank_gives_the_same_output(micro_net):
    z, t, cond = _micro_inputs()
    bank = micro_net.encode_reference(cond)
    torch.testing.assert_close(micro_net(z, t, cond, reference=bank), micro_net(z, t, cond))


@torch.no_grad()
def test_frames_are_denoised_jointly_but_clips_independently(micro_net):
    """Temporal attention mixes frames of one clip, never frames of two clips in a batch."""
    z, t, cond = _micro_inputs()
    both = micro_net(z, t, cond)
    first = micro_net(z[:1], t[:1], Conditions(cond.ref[:1], cond.motion[:1], cond.audio[:1]))
    torch.testing.assert_close(both[:1], first, atol=1e-5, rtol=1e-4)
    z2 = z.clone()
    z2[0, -1] += 1.0
    moved = micro_net(z2, t, cond)
    assert not torch.allclose(moved[0, 0], both[0, 0], atol=1e-5)  # frame 0 sees frame F-1


def test_fresh_temporal_layer_is_identity():
    layer = TemporalAttention(32, 4, 16)
    x = torch.randn(6, 32, 3, 3)
    torch.testing.assert_close(layer(x, torch.randn(2, 2, 32, 3, 3), num_frames=3), x)


def test_audio_feature_mismatch_is_a_clear_error(micro_net):
    z, t, cond = _micro_inputs()
    cond.audio = cond.audio[..., :7]
    with pytest.raises(ValueError, match="audio features"):
        micro_net(z, t, cond)


def test_space_to_depth_codec_is_exact():
    codec = SpaceToDepthCodec(factor=4)
    x = torch.rand(3, 3, 64, 64) * 2 - 1
    z = codec.encode(x)
    assert z.shape == (3, 48, 16, 16)
    assert torch.equal(codec.decode(z), x)


def test_sd15_preset_on_meta_device():
    """SD1.5 shapes without allocating: each UNet is exactly SD1.5's (859,520,964 parameters)."""
    sd15 = load_preset("sd15")
    net_cfg = {k: v for k, v in sd15["net"].items() if k != "pretrained"}
    with torch.device("meta"):
        unet = UNet2DConditionModel(**net_cfg["unet"])
        net = AvatarDenoiser(**net_cfg)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(unet) == 859_520_964
    head = count(unet.conv_out) + count(unet.conv_norm_out)
    assert count(net.reference_net) == count(unet) - head  # the unused output head is dropped
    temporal = [m for m in net.denoising_net.modules() if isinstance(m, TemporalAttention)]
    assert len(temporal) == 16  # one after each of SD1.5's 16 transformer blocks
    assert count(net) == count(net.reference_net) + count(net.denoising_net) + count(net.audio_projection)
    assert net.audio_projection.in_dim == 12 * 768
    # a forward pass on meta tensors checks every shape in the graph
    cond = Conditions(ref=torch.empty(1, 4, 64, 64, device="meta"), motion=torch.empty(1, 2, 4, 64, 64, device="meta"),
                      audio=torch.empty(1, 2, 5, 12, 768, device="meta"))
    out = net(torch.empty(1, 2, 4, 64, 64, device="meta"), torch.tensor([500], device="meta"), cond)
    assert out.shape == (1, 2, 4, 64, 64) and out.device.type == "meta"


def test_vae_codec_shapes_on_meta():
    cfg = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=[128, 256, 512, 512],
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
               layers_per_block=2, scaling_factor=0.18215)
    with torch.device("meta"):
        codec = VAECodec(config=cfg)
    assert codec.downsample == 8 and codec.latent_channels == 4
    with pytest.raises(FileNotFoundError, match="does not exist"):
        VAECodec(path="/nonexistent/sd15")


def test_pretrained_unet_loads_from_a_local_folder(tmp_path):
    """The real loading path (UNet2DConditionModel.from_pretrained, local only) on a tiny saved UNet."""
    torch.manual_seed(1)
    UNet2DConditionModel(**MICRO["net"]["unet"]).save_pretrained(tmp_path / "unet")
    net = AvatarDenoiser(**MICRO["net"], pretrained=str(tmp_path))
    saved = UNet2DConditionModel.from_pretrained(tmp_path / "unet")
    torch.testing.assert_close(net.denoising_net.conv_in.weight, saved.conv_in.weight)
    torch.testing.assert_close(net.reference_net.conv_in.weight, saved.conv_in.weight)


@pytest.mark.parametrize("kind", ["time_embedding", "layer", "layer_tokens"])
def test_sd15_fast_student_on_meta_device_costs_about_one_pass(kind):
    """At SD1.5 size a step of a student told its CFG scales costs (in flops, counted on meta tensors)
    within 1% of the teacher network's conditional pass: the CFG conditioning is nearly free."""
    from torch.utils.flop_counter import FlopCounterMode

    net_cfg = {k: v for k, v in load_preset("sd15")["net"].items() if k != "pretrained"}
    cond = Conditions(ref=torch.empty(1, 4, 64, 64, device="meta"), motion=torch.empty(1, 2, 4, 64, 64, device="meta"),
                      audio=torch.empty(1, 8, 5, 12, 768, device="meta"), guidance=torch.empty(1, 2, device="meta"))
    z, t = torch.empty(1, 8, 4, 64, 64, device="meta"), torch.tensor([500], device="meta")
    flops = {}
    for variant in ("none", kind):
        with torch.device("meta"):
            net = AvatarDenoiser(**net_cfg, cfg_conditioning=variant)
        bank = net.encode_reference(cond)
        with FlopCounterMode(display=False) as counter:
            out = net(z, t, cond, reference=bank)
        flops[variant] = counter.get_total_flops()
        assert out.shape == z.shape
    assert 1.0 <= flops[kind] / flops["none"] < 1.01
    if kind != "time_embedding":
        cfg_layers = [n for n, _ in net.named_modules() if n.endswith("processor.cfg_layer")]
        assert len(cfg_layers) == 16  # one after each of SD1.5's 16 audio attentions


def test_activation_checkpointing_gives_the_same_gradients():
    """Recomputed slots see the context of their own forward, even after another forward replaced it."""
    torch.manual_seed(0)
    net = AvatarDenoiser(**MICRO["net"], cfg_conditioning="layer_tokens")
    for module in net.modules():  # zero-initialised outputs would hide a wrong bank in recomputation
        if isinstance(module, TemporalAttention):
            torch.nn.init.normal_(module.attn.to_out[0].weight, std=0.02)
    z, t, cond = _micro_inputs()
    cond = Conditions(**{**cond.__dict__, "guidance": torch.tensor([[2.0, 6.5], [1.0, 3.0]])})
    grads = []
    for checkpointing in (False, True):
        net.zero_grad(set_to_none=True)
        out = net.set_activation_checkpointing(checkpointing)(z, t, cond)
        net(*_micro_inputs(seed=1)[:2], cond)  # another forward in between: a new bank in the shared context
        out.square().mean().backward()
        grads.append({n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(net.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6, msg=name)
