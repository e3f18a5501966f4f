"""Multi-CFG conditioning of the student (SPEC Eq 10, models/cfg.py) and one-pass sampling told the scales."""
import pytest
import torch

from fada_lightning.diffusion.guidance import Conditions
from fada_lightning.diffusion.sampling import NFECounter, denoiser_for
from fada_lightning.models.cfg import CFG_CONDITIONING, CFGTokens
from fada_lightning.models.denoiser import AvatarDenoiser
from fada_lightning.presets import load_preset


def test_the_cfg_embedding_reproduces_the_eq9_coefficients():
    tokens = CFGTokens(num_tokens=3, dim=8)
    scales = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 0.0], [2.0, 6.5]])  # (s_r, s_a)
    e = tokens(scales)
    assert e.shape == (4, 3, 8)
    torch.testing.assert_close(e[0], tokens.full)  # s_a = s_r = 1: T_ar
    torch.testing.assert_close(e[1], tokens.ref)  # s_a = 0, s_r = 1: T_r
    torch.testing.assert_close(e[2], tokens.uncond)  # s_r = s_a = 0: T_0
    expected = tokens.uncond + 2.0 * (tokens.ref - tokens.uncond) + 6.5 * (tokens.full - tokens.ref)  # Eq 10
    torch.testing.assert_close(e[3], expected)
    assert len({id(p) for p in tokens.parameters()}) == 3


def _inputs(b=2, f=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    cond = Conditions(ref=torch.randn(b, 12, 16, 16, generator=g), motion=torch.randn(b, 2, 12, 16, 16, generator=g),
                      audio=torch.randn(b, f, 5, 1, 128, generator=g))
    return torch.randn(b, f, 12, 16, 16, generator=g), torch.tensor([700, 80]), cond


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return AvatarDenoiser(**load_preset("micro")["net"]).eval()


def _student(teacher, kind: str) -> AvatarDenoiser:
    student = AvatarDenoiser(**load_preset("micro")["net"], cfg_conditioning=kind).eval()
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    assert unexpected == [] and (kind == "none") == (missing == [])
    return student


@pytest.mark.parametrize("kind", CFG_CONDITIONING)
def test_a_fresh_cfg_conditioning_leaves_the_output_unchanged(teacher, kind):
    student = _student(teacher, kind)
    z, t, cond = _inputs()
    told = cond.with_guidance(torch.tensor([2.0, 0.5]), torch.tensor([6.5, 9.0]))
    with torch.no_grad():
        assert torch.equal(student(z, t, told), teacher(z, t, cond))
    assert student.takes_guidance == (kind != "none")
    if kind != "none":
        with pytest.raises(ValueError, match="guidance"):
            student(z, t, cond)


@pytest.mark.parametrize("kind", ["time_embedding", "layer", "layer_tokens"])
def test_a_trained_cfg_conditioning_makes_the_output_follow_the_scales(teacher, kind):
    student = _student(teacher, kind)
    new = [n for n, _ in student.named_parameters() if n not in teacher.state_dict()]
    assert new and all(("cfg" in n or "cond_proj" in n) for n in new), new
    with torch.no_grad():  # stand-in for training: move every zero-initialised output off zero
        for name, p in student.named_parameters():
            if name in new and not p.any():
                p.normal_(0, 0.05)
    z, t, cond = _inputs()
    with torch.no_grad():
        low = student(z, t, cond.with_guidance(1.0, 3.0))
        high = student(z, t, cond.with_guidance(2.5, 9.0))
        again = student(z, t, cond.with_guidance(2.5, 9.0))
    assert torch.equal(high, again) and (high - low).abs().mean() > 1e-4


def test_one_pass_sampling_tells_the_student_its_scales(teacher):
    student = _student(teacher, "layer_tokens")
    z, t, cond = _inputs()
    seen = []
    real_forward = student.forward

    def spy(sample, timestep, c, reference=None):
        seen.append(c.guidance)
        return real_forward(sample, timestep, c, reference)

    student.forward = spy
    counter = NFECounter(student, clips=2)
    with torch.no_grad():
        denoiser_for(counter, cond, 2.0, 6.5)(z, t)
    assert counter.nfe == 1 and torch.equal(seen[0], torch.tensor([[2.0, 6.5], [2.0, 6.5]]))
    counter = NFECounter(teacher, clips=2)
    with torch.no_grad():
        denoiser_for(counter, cond, 2.0, 6.5)(z, t)
    assert counter.nfe == 3  # a network that does not take the scales gets Eq 9's three passes


def test_a_student_told_its_scales_needs_a_guided_distiller(teacher_ckpt):
    from distillers.perflow import PeRFlow
    from fada_lightning.distill import DistillModule
    from fada_lightning.presets import ConfigError

    with pytest.raises(ConfigError, match="mode: guided"):
        DistillModule(teacher_ckpt, PeRFlow(mode="balanced"), cfg_conditioning="layer_tokens")
    with pytest.raises(ValueError, match="cfg_conditioning must be one of"):
        DistillModule(teacher_ckpt, PeRFlow(mode="guided"), cfg_conditioning="tokens")
    with pytest.raises(ValueError, match="only guided mode"):
        PeRFlow(mode="balanced", audio_scale=(3.0, 9.0))


def test_the_cfg_layer_is_cross_attention_of_every_frame_to_its_clip_tokens():
    """Against diffusers' Attention run per frame on the clip's tokens repeated, with the same weights."""
    from diffusers.models.attention_processor import Attention

    from fada_lightning.models.cfg import CFGLayer

    torch.manual_seed(0)
    b, f, hw, c, heads, n, d = 2, 3, 10, 16, 4, 5, 12
    layer = CFGLayer(c, heads, d)
    torch.nn.init.normal_(layer.to_out.weight)
    reference = Attention(query_dim=c, cross_attention_dim=d, heads=heads, dim_head=c // heads, out_bias=True)
    with torch.no_grad():
        reference.to_q.weight.copy_(layer.to_q.weight)
        reference.to_k.weight.copy_(layer.to_kv.weight[:c])
        reference.to_v.weight.copy_(layer.to_kv.weight[c:])
        reference.to_out[0].weight.copy_(layer.to_out.weight)
        reference.to_out[0].bias.copy_(layer.to_out.bias)
    x, tokens = torch.randn(b * f, hw, c), torch.randn(b, n, d)
    expected = reference(layer.norm(x), encoder_hidden_states=tokens.repeat_interleave(f, dim=0))
    torch.testing.assert_close(layer(x, layer.fold(tokens)), expected)
