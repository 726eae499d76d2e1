"""Training previews of DCI Train Concept on the tiny in-memory SD1.5: they are the stock sampler's images of
the concept as it stands, are shown and saved beside the loss curve, leave training bit-identical, and a
Cancel during a preview stops training cleanly with the last step's checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from dci.comfyui.training.loop import train_concept
from dci.comfyui.training.preview import STEPS, Previews, default_prompts, preview_folder
from dci.comfyui.training.settings import TrainSettings
from dci.files.concept import TRAIN_STATE_SUFFIX, load_concept
from dev.fixtures import concepts_folder

from .test_trainer import BASE


@pytest.fixture()
def setup(comfy, tiny_sd15_loaded):
    model, clip, vae = tiny_sd15_loaded
    images = torch.rand(2, 64, 64, 3, generator=torch.Generator().manual_seed(1))
    return comfy, model, clip, vae, images


@pytest.fixture()
def progress():
    """Every report of ComfyUI's progress bars, through its global hook (what the server forwards)."""
    import comfy.utils

    calls: list[tuple[int, int, object]] = []
    reactions: list = []

    def hook(value, total, preview, node_id=None):
        calls.append((value, total, preview))
        for react in reactions:
            react(calls)

    before = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    yield calls, reactions
    comfy.utils.set_progress_bar_global_hook(before)


def stock_preview(comfy, model, clip, vae, prompt: str, seed: int) -> torch.Tensor:
    pos = comfy.run_node("CLIPTextEncode", clip=clip, text=prompt)[0][0]
    neg = comfy.run_node("CLIPTextEncode", clip=clip, text="")[0][0]
    (latent,) = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    (out,), _ = comfy.run_node("KSampler", model=model, seed=seed, steps=STEPS, cfg=5.0, sampler_name="euler",
                               scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    return comfy.run_node("VAEDecode", samples=out, vae=vae)[0][0][0]


def test_previews_are_the_stock_samplers_images_of_the_current_concept_shown_and_saved(setup, progress):
    comfy, model, clip, vae, images = setup
    calls, _ = progress
    (m, c, ref, curve), ui = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=images,
                                            save_name="t_previews", **{**BASE, "seed": 4}, preview_every=1)
    folder, subfolder = preview_folder("t_previews")
    names = sorted(p.name for p in folder.glob("*.png"))
    assert names == ["loss_curve.png", "preview_step000001.png", "preview_step000002.png"]
    assert [(i["filename"], i["subfolder"], i["type"]) for i in ui["images"]] == [
        ("preview_step000002.png", subfolder, "output"), ("loss_curve.png", subfolder, "output")]
    # one image per default prompt, side by side at the training resolution; shown live after each preview
    row = torch.from_numpy(np.array(Image.open(folder / "preview_step000002.png"))).float() / 255
    assert row.shape == (64, 128, 3)
    live = [p for _, _, p in calls if p is not None]
    assert len(live) == 2 and live[-1][0] == "PNG" and live[-1][1].size == (128, 64)
    # the last preview is what the stock KSampler (Euler, seed = the run's seed + prompt index, CFG 5 against
    # the empty prompt) and VAE Decode give with the trained MODEL and CLIP
    prompts = default_prompts("qxz", "dog")
    for i, prompt in enumerate(prompts):
        expected = stock_preview(comfy, m, c, vae, prompt, seed=4 + i)
        torch.testing.assert_close(row[:, 64 * i:64 * (i + 1)], expected, rtol=0, atol=2 / 255)
    assert not torch.equal(row[:, :64], row[:, 64:])
    assert Image.open(folder / "loss_curve.png").size == (512, 256)


def _settings(steps: int) -> TrainSettings:
    return TrainSettings(class_noun="dog", trigger="qxz", steps=steps, learning_rate=1e-4, resolution=64,
                         checkpoint_every=0)


def _run(model, clip, vae, images, name, steps, previews=None, resume=False):
    with torch.inference_mode():
        return train_concept(model, clip, vae, images, _settings(steps), concepts_folder(), name,
                             overwrite=not resume, resume=resume, previews=previews)


def test_cancel_during_a_preview_keeps_the_last_checkpoint_and_previews_leave_training_unchanged(setup, progress):
    import comfy.model_management as mm

    comfy, model, clip, vae, images = setup
    calls, reactions = progress
    plain = _run(model, clip, vae, images, "t_prev_plain", 3)
    calls.clear()
    folder, subfolder = preview_folder("t_prev_cancel")

    def cancel_inside_the_first_preview(seen):
        # reports at value 1: the end of step 1, then one per sampling step of its preview
        if sum(1 for v, _, p in seen if v == 1 and p is None) == 4:
            mm.interrupt_current_processing(True)

    reactions.append(cancel_inside_the_first_preview)
    with pytest.raises(mm.InterruptProcessingException):
        _run(model, clip, vae, images, "t_prev_cancel", 3, Previews(1, ["a qxz dog"], folder, subfolder))
    reactions.clear()
    assert sum(1 for v, _, p in calls if v == 1) < STEPS  # stopped inside the preview's sampling
    assert load_concept(concepts_folder() / "t_prev_cancel.safetensors").steps == 1
    assert (concepts_folder() / f"t_prev_cancel{TRAIN_STATE_SUFFIX}").is_file()
    assert not (folder / "preview_step000001.png").exists()
    # resumed with previews on: the same losses and tensors as the run that never previewed
    resumed = _run(model, clip, vae, images, "t_prev_cancel", 3, Previews(1, ["a qxz dog"], folder, subfolder),
                   resume=True)
    assert resumed.losses == plain.losses
    for part in ("kv_deltas", "tokens", "contexts"):
        a, b = getattr(plain.concept, part), getattr(resumed.concept, part)
        assert all(torch.equal(a[k], b[k]) for k in a), part
    assert sorted(p.name for p in folder.glob("preview_*.png")) == ["preview_step000002.png",
                                                                    "preview_step000003.png"]
