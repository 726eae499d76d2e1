"""Datasets as users keep them: ComfyUI's stock "Load Image Dataset from Folder" (a list of images of different
sizes) feeds DCI Train Concept directly, each image centre-cropped to a square and resized to the training
resolution; per-image masks of the images' own sizes restrict the loss."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dci.files.concept import load_concept
from dci.method import ico
from dev.fixtures import concepts_folder

from .test_trainer import BASE

SIZES = ((72, 96), (64, 64), (100, 80))  # height, width


@pytest.fixture()
def dataset(comfy, tiny_sd15_loaded):
    """Three photos of different sizes in input/dci_dataset_test, loaded by the stock node."""
    import folder_paths
    from PIL import Image

    folder = Path(folder_paths.get_input_directory()) / "dci_dataset_test"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i, (h, w) in enumerate(SIZES):
        pixels = (torch.rand(h, w, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(folder / f"photo_{i}.png")
    (images,), _ = comfy.run_node_lists("LoadImageDataSetFromFolder", folder=["dci_dataset_test"])
    model, clip, vae = tiny_sd15_loaded
    return comfy, model, clip, vae, images


def train_list(comfy, model, clip, vae, images, name, masks=None):
    inputs = {**BASE, "random_flip": False, "model": model, "clip": clip, "vae": vae, "save_name": name}
    lists = {k: [v] for k, v in inputs.items()}
    if masks is not None:
        lists["mask"] = masks
    comfy.run_node_lists("DCITrainConcept", images=images, **lists)
    return load_concept(concepts_folder() / f"{name}.safetensors")


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, p)[k], getattr(b, p)[k]) for p in ("kv_deltas", "tokens", "contexts")
               for k in getattr(a, p))


def test_the_stock_dataset_loader_feeds_the_trainer_as_the_squared_batch(dataset):
    comfy, model, clip, vae, images = dataset
    assert sorted(tuple(x.shape[1:3]) for x in images) == sorted(SIZES)  # a list, one IMAGE per file
    listed = train_list(comfy, model, clip, vae, images, "t_dataset_list")
    assert listed.training["images"] == 3
    squared = torch.cat([ico.square_images(x, 64) for x in images])  # the stated rule
    (m, c, ref, curve), _ = comfy.run_node("DCITrainConcept", model=model, clip=clip, vae=vae, images=squared,
                                           save_name="t_dataset_batch", **{**BASE, "random_flip": False})
    assert same(listed, load_concept(concepts_folder() / "t_dataset_batch.safetensors"))


def test_per_image_masks_of_each_images_size_restrict_the_loss(dataset):
    comfy, model, clip, vae, images = dataset
    ones = [torch.ones(1, *x.shape[1:3]) for x in images]
    plain = train_list(comfy, model, clip, vae, images, "t_dataset_plain")
    full = train_list(comfy, model, clip, vae, images, "t_dataset_ones", masks=ones)
    # all-ones masks: the plain loss (up to the rounding of resizing a constant mask with its image)
    assert full.training["masked_loss"] is True and plain.training["masked_loss"] is False
    assert full.training["last_loss"] == pytest.approx(plain.training["last_loss"], rel=1e-5)
    halves = [m.clone() for m in ones]
    for m in halves:
        m[:, :, : m.shape[2] // 2] = 0  # the left half of each photo does not count
    halved = train_list(comfy, model, clip, vae, images, "t_dataset_half", masks=halves)
    assert halved.training["last_loss"] < 0.8 * plain.training["last_loss"]
    with pytest.raises(ValueError, match="one MASK for all concept images or one per image"):
        train_list(comfy, model, clip, vae, images, "t_dataset_bad", masks=ones[:2])
