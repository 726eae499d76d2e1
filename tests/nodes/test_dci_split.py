"""``split`` is a noise level: the two-branch phase ends at ComfyUI's ``percent_to_sigma(split)``.

The reference code runs both branches while its DDIM timestep t satisfies t / 1000 > 1 - split; ComfyUI's
start/end percents (ControlNet, conditioning timestep ranges) use ``model_sampling.percent_to_sigma``. The
probe (``dev.fixtures.BranchProbe``) records every UNet call's sigma and whether it carried both branches.
"""

from __future__ import annotations

import pytest
import torch

from dci.comfyui.sampling.guider import phase_end_sigma
from dci.method.branches import two_branch_steps
from dev.fixtures import BranchProbe, random_concept, write_concept


def prepared(comfy, tiny_sd15, probe: BranchProbe):
    model, clip = tiny_sd15[:2]
    name = write_concept(random_concept(model, clip), "split")
    (m, c, ref), _ = comfy.run_node("DCILoadConcept", model=model, clip=clip, concept_name=name,
                                    strength_model=1.0, strength_clip=1.0)
    (pos,), _ = comfy.run_node("DCIPromptEncode", clip=c, text="a photo of sks dog on the beach", auxiliary_noun="",
                               concept=ref)
    (neg,), _ = comfy.run_node("CLIPTextEncode", clip=c, text="blurry")
    (lat,), _ = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)
    return dict(model=probe.attach(m), seed=3, cfg=5.0, positive=pos, negative=neg, latent_image=lat)


def schedule(model, scheduler: str, steps: int, denoise: float = 1.0) -> torch.Tensor:
    import comfy.samplers

    return comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler="euler", scheduler=scheduler,
                                   denoise=denoise).sigmas


def sample(comfy, args, probe, split, steps=20, sampler="euler", scheduler="normal", denoise=1.0, node="DCIKSampler"):
    probe.calls.clear()
    extra = {"split": split, "lam": 1.0, "aux_map": "reference", "guidance": "shared", "aux_seed": 1}
    (out,), _ = comfy.run_node(node, **args, steps=steps, sampler_name=sampler, scheduler=scheduler, denoise=denoise,
                               **(extra if node == "DCIKSampler" else {}))
    return out["samples"]


def test_under_ddim_uniform_a_noise_level_and_a_share_of_the_steps_agree_within_one_step(comfy, tiny_sd15):
    """ddim_uniform spaces the timesteps evenly, as the reference's DDIM does: there the noise-level split,
    a count of round(split × steps) steps and the reference's own rule on the timesteps differ by at most
    one step (a timestep right at the boundary), and at the reference's 200 steps they are equal."""
    model = tiny_sd15[0]
    sampling = model.get_model_object("model_sampling")
    for steps in (10, 20, 33, 50, 200):
        sigmas = schedule(model, "ddim_uniform", steps)
        n = len(sigmas) - 1
        timesteps = [float(sampling.timestep(s)) for s in sigmas[:-1]]
        for split in (0.1, 0.2, 0.25, 0.3, 0.5, 0.75, 0.9):
            by_noise = two_branch_steps(sigmas, phase_end_sigma(model, split))
            by_reference_rule = sum(t / 1000 > 1 - split for t in timesteps)
            assert abs(by_noise - round(split * n)) <= 1, (steps, split)
            assert abs(by_noise - by_reference_rule) <= 1, (steps, split)
            if steps == 200 and split in (0.2, 0.3):
                assert by_noise == by_reference_rule == round(split * n)


def test_the_sampler_runs_two_branches_exactly_on_the_steps_above_the_split_sigma(comfy, tiny_sd15):
    probe = BranchProbe()
    args = prepared(comfy, tiny_sd15, probe)
    sigmas = schedule(args["model"], "ddim_uniform", 20)
    sample(comfy, args, probe, split=0.3, sampler="ddim", scheduler="ddim_uniform")
    end = phase_end_sigma(args["model"], 0.3)
    expected = [float(s) for s in sigmas[:-1] if s > end]
    assert probe.sigmas(True) == pytest.approx(expected) and len(expected) == 6
    assert probe.sigmas(False) == pytest.approx([float(s) for s in sigmas[:-1] if s <= end])


def test_the_phase_ends_at_the_same_sigma_under_normal_karras_and_exponential(comfy, tiny_sd15):
    probe = BranchProbe()
    args = prepared(comfy, tiny_sd15, probe)
    end = phase_end_sigma(args["model"], 0.3)
    counts = {}
    for scheduler in ("normal", "karras", "exponential"):
        sample(comfy, args, probe, split=0.3, scheduler=scheduler)
        two, one = probe.sigmas(True), probe.sigmas(False)
        assert two and one, scheduler
        assert min(two) > end >= max(one), scheduler  # every call above the split sigma, and only those
        counts[scheduler] = len(two)
        assert counts[scheduler] == two_branch_steps(schedule(args["model"], scheduler, 20), end)
    # the same noise level is reached after different numbers of steps: a step count could not do this
    assert counts == {"normal": 6, "karras": 7, "exponential": 5}


def test_split_zero_is_the_stock_ksampler_and_split_one_runs_two_branches_to_the_end(comfy, tiny_sd15):
    probe = BranchProbe()
    args = prepared(comfy, tiny_sd15, probe)
    for scheduler in ("karras", "exponential"):
        stock = sample(comfy, args, probe, split=0.0, steps=8, scheduler=scheduler, node="KSampler")
        assert torch.equal(sample(comfy, args, probe, split=0.0, steps=8, scheduler=scheduler), stock)
        assert probe.calls and not probe.sigmas(True)
    for sampler in ("euler", "heun", "euler_ancestral"):
        sample(comfy, args, probe, split=1.0, steps=5, sampler=sampler)
        assert probe.calls and not probe.sigmas(False), sampler  # every model call, the last step's too
        if sampler != "heun":
            assert len(probe.sigmas(True)) == 5


def test_a_partial_denoise_runs_two_branches_only_above_the_split_sigma(comfy, tiny_sd15):
    """denoise 0.5 starts halfway down the noise schedule: split 0.3 ends above that, so nothing runs two
    branches and the result is the stock KSampler's bit for bit; split 0.8 ends below it, so the first steps
    of the partial schedule (those above the split sigma) run two branches."""
    probe = BranchProbe()
    args = prepared(comfy, tiny_sd15, probe)
    stock = sample(comfy, args, probe, split=0.0, steps=6, denoise=0.5, node="KSampler")
    assert torch.equal(sample(comfy, args, probe, split=0.3, steps=6, denoise=0.5), stock)
    assert not probe.sigmas(True)
    out = sample(comfy, args, probe, split=0.8, steps=6, denoise=0.5)
    sigmas = schedule(args["model"], "normal", 6, denoise=0.5)
    end = phase_end_sigma(args["model"], 0.8)
    assert probe.sigmas(True) == pytest.approx([float(s) for s in sigmas[:-1] if s > end])
    assert 0 < len(probe.sigmas(True)) < 6 and not torch.equal(out, stock)
