"""The toy base model's training script, on a few dozen scenes and a handful of steps (batch 4): it writes a
file the toy-world loader runs, resumes from its work folder into the layout phase (v-prediction on the
zero-terminal-SNR schedule, as the shipped model), and a resumed run ends bit-identical to a straight one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "dev" / "toyworld" / "train_base.py"
SMALL = ["--images", "48", "--vae-steps", "4", "--decoder-steps", "2", "--text-steps", "3", "--batch", "4",
         "--ckpt-minutes", "60"]


def train(work: Path, out: Path, *extra: str) -> str:
    cmd = [sys.executable, str(SCRIPT), "--work", str(work), "--out", str(out), *SMALL, *extra]
    env = dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture(scope="module")
def runs(comfy, tmp_path_factory):
    """A run interrupted at the phase boundary and resumed, and the same schedule run straight through."""
    root = tmp_path_factory.mktemp("toy_train")
    layout = ["--unet-steps", "2", "--layout-steps", "2", "--layout-prediction", "v", "--layout-zsnr"]
    first = train(root / "resumed", root / "a.safetensors", "--unet-steps", "2")
    resumed = train(root / "resumed", root / "b.safetensors", *layout)
    straight = train(root / "straight", root / "c.safetensors", *layout)
    return root, first, resumed, straight


def test_writes_a_loadable_model_with_its_recipe(runs):
    root, first, _, _ = runs
    out = root / "a.safetensors"
    meta = metadata(out)
    assert meta["toyworld.steps"] == "2" and meta["toyworld.layout_steps"] == "0"
    assert meta["toyworld.prediction"] == "eps" and meta["toyworld.zsnr"] == "false"
    assert "wrote" in first
    assert "text step 3/3" in first
    assert meta["toyworld.text_steps"] == "3" and meta["toyworld.text_aux"] == "0.1"
    from dci.toyworld.model import load_toyworld

    model, clip, vae = load_toyworld(out)
    assert model.model.model_config.__class__.__name__ == "SD15"
    tokens = clip.tokenize("a red circle at the left")
    assert clip.encode_from_tokens(tokens).shape[-1] == 64


def test_resumes_into_the_layout_phase(runs):
    root, _, resumed, _ = runs
    assert "UNet: resumed at step 2" in resumed
    assert "VAE: resumed" in resumed and "decoder: resumed" in resumed
    assert "text encoder: resumed" in resumed
    meta = metadata(root / "b.safetensors")
    assert meta["toyworld.steps"] == "4" and meta["toyworld.layout_steps"] == "2"
    assert meta["toyworld.prediction"] == "v" and meta["toyworld.zsnr"] == "true"
    assert metadata(root / "resumed" / "unet_ckpt.safetensors")["opt_format"] == "2"
    import comfy.model_sampling

    from dci.toyworld.model import load_toyworld

    model, _, _ = load_toyworld(root / "b.safetensors")
    sampling = model.get_model_object("model_sampling")
    assert isinstance(sampling, comfy.model_sampling.V_PREDICTION)
    assert float(sampling.sigma_max) > 1000  # zero terminal SNR: the top step is (numerically) pure noise


def test_zsnr_needs_v_prediction(tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--work", str(tmp_path), "--out", str(tmp_path / "x.safetensors"),
           "--layout-steps", "2", "--layout-zsnr"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode != 0 and "needs --layout-prediction v" in proc.stderr
    assert not (tmp_path / "x.safetensors").exists()


def test_resumed_run_equals_straight_run(runs):
    root, *_ = runs
    a, b = load_file(str(root / "b.safetensors")), load_file(str(root / "c.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, different[:5]
    # and training did something: the layout phase changed the weights
    first = load_file(str(root / "a.safetensors"))
    assert any(not (first[k] == a[k]).all() for k in a if k.startswith("model."))


def test_resume_refuses_another_architecture(runs):
    root, *_ = runs
    cmd = [sys.executable, str(SCRIPT), "--work", str(root / "resumed"), "--out", str(root / "d.safetensors"), *SMALL,
           "--unet-steps", "2", "--layout-steps", "4", "--unet-config", '{"model_channels": 32}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "was trained with UNet" in proc.stderr, proc.stderr[-2000:]
    assert not (root / "d.safetensors").exists()
    bad = subprocess.run([*cmd[:-1], '{"channels": 32}'], capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode != 0 and "unknown keys ['channels']" in bad.stderr, bad.stderr[-2000:]


def load_script():
    import importlib.util

    spec = importlib.util.spec_from_file_location("train_base", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_caption_labels_name_every_attribute_or_none(comfy):
    tb = load_script()
    names = list(tb.attribute_classes())
    labels = dict(zip(names, tb.caption_labels("a small red ring with yellow stripes at the left on a blue grid background"),
                      strict=True))
    classes = tb.attribute_classes()
    assert classes["position"][labels["position"] - 1] == "left"
    assert classes["shape"][labels["shape"] - 1] == "ring"
    assert classes["colour"][labels["colour"] - 1] == "red"
    assert classes["pattern_colour"][labels["pattern_colour"] - 1] == "yellow"
    assert classes["background"][labels["background"] - 1] == "blue"
    assert classes["texture"][labels["texture"] - 1] == "grid"
    assert labels["emblem"] == 0
    assert tb.caption_labels("") == [0] * len(names)
    assert tb.caption_labels("a circle")[names.index("position")] == 0


def test_attribute_heads_read_only_end_of_text_and_padding(comfy):
    import torch

    tb = load_script()
    heads = tb.AttributeHeads(8)
    ids = torch.tensor([[49406, 320, 49407, 49407], [49406, 320, 736, 49407]])
    labels = torch.zeros(2, len(heads.sizes), dtype=torch.long)
    ctx = torch.randn(2, 4, 8, requires_grad=True)
    heads.loss(ctx, ids, labels).backward()
    grad = ctx.grad.abs().sum(dim=-1)
    assert (grad[0, :2] == 0).all() and (grad[0, 2:] > 0).all()
    assert (grad[1, :3] == 0).all() and (grad[1, 3] > 0).all()


def test_vae_from_takes_another_files_vae(runs):
    root, *_ = runs
    source = root / "a.safetensors"
    out = root / "e.safetensors"
    log = train(root / "vae_from", out, "--unet-steps", "1", "--vae-from", str(source))
    assert f"VAE: taken from {source}" in log and "VAE step" not in log
    a, e = load_file(str(source)), load_file(str(out))
    vae_keys = [k for k in a if k.startswith("first_stage_model.")]
    assert vae_keys and all(torch_equal(a[k], e[k]) for k in vae_keys)
    assert metadata(out)["toyworld.vae_from"] == "a.safetensors"


def torch_equal(x, y) -> bool:
    return bool((x == y).all())
