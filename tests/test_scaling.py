"""The memory and cost model (fada_lightning/scaling.py): meta-device measurements equal real ones on micro."""
import pytest
import torch

from fada_lightning import scaling


@pytest.fixture(scope="module")
def micro_pair():
    torch.manual_seed(0)
    with torch.device("cpu"):
        real = scaling.AvatarDenoiser(**scaling.load_preset("micro")["net"], cfg_conditioning="layer_tokens")
    return real, scaling.meta_denoiser("micro", "layer_tokens")


def real_saved_bytes(net, checkpointing: bool) -> int:
    """What autograd keeps on the CPU, with the CPU's own fused attention kernel."""
    net = net.float().set_activation_checkpointing(checkpointing)
    total = 0

    def pack(tensor):
        nonlocal total
        total += tensor.numel() * tensor.element_size()
        return tensor

    z, t, cond = scaling.example_inputs(net, 1, 4, device="cpu")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        net(z.requires_grad_(), t, cond)
    net.set_activation_checkpointing(False)
    return total


def test_meta_counts_equal_real_counts_on_micro(micro_pair):
    real, meta = micro_pair
    assert scaling.count(meta) == scaling.count(real)
    for checkpointing in (False, True):
        assert scaling.saved_activation_bytes(meta, 1, 4, checkpointing, torch.float32) == real_saved_bytes(
            real, checkpointing) > 0
    assert scaling.saved_activation_bytes(meta, 1, 4, True, torch.float32) < 0.6 * real_saved_bytes(real, False)
    # FLOPs: on meta SDPA is counted as its math decomposition, on the CPU as the fused kernel (2% apart here)
    on_meta, on_cpu = scaling.forward_flops(meta, 1, 4), scaling.forward_flops(real, 1, 4, device="cpu")
    assert on_cpu > 0 and abs(on_meta / on_cpu - 1) < 0.03


def test_sharding_divides_every_state_by_the_gpus():
    ddp = scaling.state_gib_per_gpu(1_000_000, 2_000_000, 8, sharded=False)
    fsdp = scaling.state_gib_per_gpu(1_000_000, 2_000_000, 8, sharded=True)
    assert ddp["trained + grads + AdamW"] * 2**30 == 16_000_000 and ddp["teacher"] * 2**30 == 4_000_000
    assert all(abs(fsdp[k] * 8 - ddp[k]) < 1e-12 for k in ddp)


def test_passes_per_clip_follow_each_distillers_definition():
    """(with gradient, without) forward rows per clip over whole training steps: every network counts."""
    passes = scaling.step_passes()  # every bundled distill_<method>.yaml, read from the configs
    dmd = passes.pop("distill_dmd.yaml (DMD, 4 NFE)")
    assert passes == {
        "distill_fada_fast.yaml (MixedPeRFlow, 6 NFE)": (2, 24),  # (2B) student rows; 8 DDIM steps x 3 (Eq 9)
        "distill_mixed.yaml (MixedPeRFlow, 18 NFE)": (2, 8),  # N = 8 conditional DDIM steps in the window
        "distill_perflow.yaml (PeRFlow, 18 NFE)": (1, 8),
        "distill_rflow.yaml (RFlow, 18 NFE)": (1, 32),  # one window, 32 steps
        "distill_tcd.yaml (TCD, 6 NFE)": (1, 4),  # one guided teacher step (x 3) + the EMA's pass
        # G and, for its gradient, the teacher under D's heads; G4's 4-step chain, G's sample for D, and the
        # teacher under D's heads on G's sample, G4's output and that perturbed (R1): no gradient into them
        "distill_turbo.yaml (Adversarial, 1 NFE)": (2, 8)}
    # DMD, G every 5th step, F every step: with gradient F's 1 + G's 1/5. Without, per step: F's G sample
    # (k + 1 passes, E k = 1.5) + on G's steps k + Eq 9's 3 + F's 1, over 5: 2.5 + 5.5 / 5 = 3.6 expected,
    # and k is drawn (seeded) 40 times here
    assert dmd[0] == pytest.approx(1.2) and dmd[1] == pytest.approx(3.6, abs=0.3)


def test_a_distiller_passed_in_is_priced_without_an_edit():
    spec = {"class_path": "distillers.tcd.TCD", "init_args": {"mode": "balanced"}}
    assert scaling.step_passes({"mine": spec}) == {"mine (TCD, 18 NFE)": (1, 2)}  # one unguided step + the EMA


def test_trained_parameters_count_every_network_a_distiller_trains():
    teacher = scaling.count(scaling.meta_denoiser("sd15"))
    specs = scaling.bundled_distillers()
    assert scaling.trained_parameters(specs["distill_perflow.yaml"]) == (teacher, teacher, 0)
    assert scaling.trained_parameters(specs["distill_dmd.yaml"]) == (teacher, 2 * teacher, 0)  # G and F: the teacher's size
    student, trained, frozen = scaling.trained_parameters(specs["distill_turbo.yaml"])  # G, D's heads; G4 frozen
    assert student == frozen == teacher and 0 < trained - teacher < 0.03 * teacher  # the heads: 2% at sd15
    fada_fast, _, _ = scaling.trained_parameters(specs["distill_fada_fast.yaml"])
    assert fada_fast > teacher  # CFG layers and tokens


@pytest.mark.slow
def test_docs_scaling_shows_what_the_command_prints(capsys):
    """docs/scaling.md's figures are the ones `python -m fada_lightning.scaling` prints today."""
    from pathlib import Path

    scaling.main(["--preset", "sd15", "--frames", "16", "--gpus", "32", "--tflops", "312", "--mfu", "0.4"])
    printed = capsys.readouterr().out
    page = (Path(__file__).parents[1] / "docs" / "scaling.md").read_text()
    for figure in ["1776.3", "1820.3", "27.12", "6.78", "3.31", "0.85", "27.49", "7.04", "18.40", "202.4", "257.6",
                   "552.0", "644.0", "128.8", "131.6", "3,294", "4,192", "8,984", "10,481", "2,096", "2,141",
                   "3552.6", "62.86", "7.86", "1.96", "37.21", "4.65", "36.39", "4.55", "1811.3", "40.23", "5.03"]:
        assert figure in printed, figure
        on_page = {"18.40": "18.4", "1776.3": "1,776.3", "1820.3": "1,820.3", "3552.6": "3,552.6",
                   "1811.3": "1,811.3"}.get(figure, figure)
        assert on_page in page, figure
