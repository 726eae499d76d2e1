"""The toy base model's training script, on 16 scenes and a handful of steps (batch 4): it writes a
file the toy-world loader runs, resumes every stage from its work folder, a resumed run ends bit-identical to
a straight one, and it never replaces an existing model file unasked."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "dev" / "toyworld" / "train_base.py"
SMALL = ["--images", "16", "--vae-steps", "4", "--decoder-steps", "2", "--text-steps", "3", "--batch", "4", "--detail-steps", "0",
         "--ckpt-minutes", "60"]


def train(work: Path, out: Path, *extra: str) -> str:
    cmd = [sys.executable, str(SCRIPT), "--work", str(work), "--out", str(out), *SMALL, *extra]
    env = dict(os.environ)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


STAGES = ("vae.safetensors", "decoder.safetensors", "text.safetensors")  # what the stages before the UNet leave


def seeded(root: Path, name: str) -> Path:
    """A new work folder holding the finished VAE, decoder and text stages of the first run ("short"), so the
    run starts at the UNet stage (the earlier stages are deterministic: a fresh run would write the same files)."""
    work = root / name
    work.mkdir()
    for stage in STAGES:
        shutil.copyfile(root / "short" / stage, work / stage)
    return work


def metadata(path: Path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


@pytest.fixture(scope="module")
def runs(comfy, tmp_path_factory):
    """A 2-step run (its file is a.safetensors); a 4-step run stopped after step 2 and resumed (b); the same
    4-step run straight through (c)."""
    root = tmp_path_factory.mktemp("toy_train")
    first = train(root / "short", root / "a.safetensors", "--unet-steps", "2")
    stopped = train(seeded(root, "resumed"), root / "b.safetensors", "--unet-steps", "4", "--stop-at", "2")
    assert "stopped at step 2 of 4" in stopped and not (root / "b.safetensors").exists()
    resumed = train(root / "resumed", root / "b.safetensors", "--unet-steps", "4")
    straight = train(seeded(root, "straight"), root / "c.safetensors", "--unet-steps", "4")
    return root, first, resumed, straight


def test_writes_a_loadable_model_with_its_recipe(runs):
    root, first, _, _ = runs
    out = root / "a.safetensors"
    meta = metadata(out)
    assert meta["toyworld.steps"] == "2" and meta["toyworld.world_version"] == "toyworld-2"
    assert meta["toyworld.prediction"] == "eps" and meta["toyworld.zsnr"] == "false"
    assert "wrote" in first
    assert "text step 3/3" in first
    assert meta["toyworld.text_steps"] == "3" and meta["toyworld.text_aux"] == "0.1"
    from dci.toyworld.model import load_toyworld

    model, clip, vae = load_toyworld(out)
    assert model.model.model_config.__class__.__name__ == "SD15"
    tokens = clip.tokenize("a red circle at the left")
    assert clip.encode_from_tokens(tokens).shape[-1] == 64


def test_resumes_every_stage(runs):
    root, _, resumed, _ = runs
    assert "UNet: resumed at step 2" in resumed
    assert "VAE: resumed" in resumed and "decoder: resumed" in resumed
    assert "text encoder: resumed" in resumed
    assert metadata(root / "b.safetensors")["toyworld.steps"] == "4"
    assert metadata(root / "resumed" / "unet_ckpt.safetensors")["opt_format"] == "2"


def test_an_existing_model_file_is_not_replaced_unasked(runs):
    root, *_ = runs
    out = root / "a.safetensors"
    before = out.read_bytes()
    cmd = [sys.executable, str(SCRIPT), "--work", str(root / "short"), "--out", str(out), *SMALL, "--unet-steps", "2"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr, proc.stderr[-2000:]
    assert out.read_bytes() == before


def test_resumed_run_equals_straight_run(runs):
    root, *_ = runs
    a, b = load_file(str(root / "b.safetensors")), load_file(str(root / "c.safetensors"))
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, different[:5]
    # and training did something: the last two steps changed the weights
    first = load_file(str(root / "a.safetensors"))
    assert any(not (first[k] == a[k]).all() for k in a if k.startswith("model."))


def test_resume_refuses_another_architecture(runs):
    root, *_ = runs
    cmd = [sys.executable, str(SCRIPT), "--work", str(root / "resumed"), "--out", str(root / "d.safetensors"), *SMALL,
           "--unet-steps", "4", "--unet-config", '{"model_channels": 32}']
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "was trained with UNet" in proc.stderr, proc.stderr[-2000:]
    assert not (root / "d.safetensors").exists()
    bad = subprocess.run([*cmd[:-1], '{"channels": 32}'], capture_output=True, text=True, timeout=300, check=False)
    assert bad.returncode != 0 and "unknown keys ['channels']" in bad.stderr, bad.stderr[-2000:]


def load_script():
    from dev.toyworld import train_text

    return train_text


def test_caption_labels_name_every_attribute_or_none(comfy):
    tb = load_script()
    names = list(tb.attribute_classes())
    text = "a small red hexagon with yellow stripes at the left on a blue grid background"
    labels = dict(zip(names, tb.caption_labels(text), strict=True))
    classes = tb.attribute_classes()
    assert classes["position"][labels["position"] - 1] == "left"
    assert classes["shape"][labels["shape"] - 1] == "hexagon"
    assert classes["colour"][labels["colour"] - 1] == "red"
    assert classes["pattern"][labels["pattern"] - 1] == "stripes"
    assert classes["pattern_colour"][labels["pattern_colour"] - 1] == "yellow"
    assert classes["background"][labels["background"] - 1] == "blue"
    assert classes["texture"][labels["texture"] - 1] == "grid"
    assert labels["emblem"] == 0 and labels["emblem_colour"] == 0
    both = dict(zip(names, tb.caption_labels("a circle with a white band and a black star emblem"), strict=True))
    assert classes["emblem"][both["emblem"] - 1] == "star"
    assert classes["emblem_colour"][both["emblem_colour"] - 1] == "black"
    assert classes["pattern"][both["pattern"] - 1] == "band"
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


def test_detail_phase_keeps_the_text_encoder_and_resumes_across_its_start(runs):
    """--detail-steps continues the UNet with the text encoder frozen: the file's text encoder equals the one of
    the run without the phase, bit for bit, while the UNet moves on; a run stopped inside the phase resumes to
    the straight run's file."""
    root, _, _, _ = runs
    straight = train(seeded(root, "detail"), root / "detail.safetensors", "--unet-steps", "2", "--detail-steps", "2")
    assert "2 + 2 detail steps" in straight
    stopped = train(seeded(root, "detail_resumed"), root / "detail_resumed.safetensors", "--unet-steps", "2", "--detail-steps", "2",
                    "--stop-at", "3")
    assert "stopped at step 3 of 4" in stopped
    train(root / "detail_resumed", root / "detail_resumed.safetensors", "--unet-steps", "2", "--detail-steps", "2")
    meta = metadata(root / "detail.safetensors")
    assert meta["toyworld.steps"] == "4" and meta["toyworld.detail_steps"] == "2"
    plain, detail, resumed = (load_file(str(root / n)) for n in ("a.safetensors", "detail.safetensors", "detail_resumed.safetensors"))
    text = [k for k in plain if k.startswith("cond_stage_model.")]
    unet = [k for k in plain if k.startswith("model.diffusion_model.")]
    assert text and unet
    assert all(torch.equal(plain[k], detail[k]) for k in text)
    assert not all(torch.equal(plain[k], detail[k]) for k in unet)
    assert all(torch.equal(detail[k], resumed[k]) for k in detail)


def test_unet_from_runs_only_the_detail_phase_on_a_finished_file(runs):
    """--unet-from starts the detail phase from a model file (its work folder gone): no text stage, the text
    encoder kept bit for bit, the UNet moved on from the file's weights; without --detail-steps it refuses."""
    root, *_ = runs
    source = root / "a.safetensors"
    out = root / "from_file.safetensors"
    log = train(root / "from_file", out, "--unet-steps", "2", "--detail-steps", "2", "--vae-from", str(source),
                "--unet-from", str(source))
    assert f"UNet and text encoder taken from {source}; detail phase from step 2" in log
    assert "text step" not in log and "UNet step 4/4" in log
    a, f = load_file(str(source)), load_file(str(out))
    assert metadata(out)["toyworld.steps"] == "4"
    text = [k for k in a if k.startswith("cond_stage_model.")]
    unet = [k for k in a if k.startswith("model.diffusion_model.")]
    assert all(torch.equal(a[k], f[k]) for k in text)
    moved = [k for k in unet if not torch.equal(a[k], f[k])]
    assert moved
    # two detail steps at a tiny warm-up rate move the weights only a little from the file's
    drift = max((a[k].float() - f[k].float()).abs().max().item() for k in unet)
    assert drift < 0.05, drift
    cmd = [sys.executable, str(SCRIPT), "--work", str(root / "from_file_bad"), "--out", str(root / "g.safetensors"),
           *SMALL, "--unet-steps", "2", "--vae-from", str(source), "--unet-from", str(source)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "give --detail-steps too" in proc.stderr, proc.stderr[-2000:]
    assert not (root / "g.safetensors").exists()


def test_unet_minutes_sizes_the_schedule_and_records_it(runs):
    """--unet-minutes times the run's first steps and sets main and detail steps in their given ratio (never
    fewer main steps than the timing ran); the file's recipe records the steps that ran."""
    root, *_ = runs
    out = root / "sized.safetensors"
    log = train(seeded(root, "sized"), out, "--unet-steps", "100", "--detail-steps", "20", "--unet-minutes", "0.001")
    assert "UNet: sized to 40 + 1 steps for 0.001 minutes" in log, log[-2000:]
    assert "UNet step 41/41" in log
    meta = metadata(out)
    assert (meta["toyworld.steps"], meta["toyworld.unet_steps"], meta["toyworld.detail_steps"]) == ("41", "40", "1")
    assert meta["toyworld.asked_steps"] == "[100, 20]" and meta["toyworld.unet_minutes"] == "0.001"
    assert meta["toyworld.device"] == "cpu"
    # a run stopped after the sizing resumes under the schedule it set, also without the option
    stopped = train(seeded(root, "sized_resumed"), root / "sized_resumed.safetensors", "--unet-steps", "100",
                    "--detail-steps", "20", "--unet-minutes", "0.001", "--stop-at", "40")
    assert "sized to 40 + 1 steps" in stopped and "stopped at step 40 of 41" in stopped
    resumed = train(root / "sized_resumed", root / "sized_resumed.safetensors", "--unet-steps", "100", "--detail-steps", "20")
    assert "UNet: the time budget set 40 + 1 steps" in resumed and "UNet step 41/41" in resumed
    assert metadata(root / "sized_resumed.safetensors")["toyworld.steps"] == "41"
    from dev.toyworld.train_unet import sized_steps

    assert sized_steps(10, 0.5, 40, 7000, 1000) == (1050, 150)  # 1,200 steps in the ratio 7 : 1
    assert sized_steps(10, 0.5, 40, 7000, 0) == (1200, 0)
    assert sized_steps(0.01, 0.5, 40, 7000, 1000) == (40, 1)


@pytest.mark.parametrize("argv, message", [
    (["--device", "meta"], "only cpu and cuda are supported"),
    (["--device", "nonsense:x"], "--device nonsense:x"),
    (["--unet-minutes", "-1"], "--unet-minutes must be >= 0"),
    (["--unet-minutes", "5", "--unet-steps", "20"], "give --unet-steps 40 or more"),
    (["--unet-minutes", "5", "--unet-from", "x.safetensors", "--detail-steps", "2"], "with --unet-from give --detail-steps"),
])
def test_bad_device_and_budget_arguments_are_refused(comfy, tmp_path, argv, message):
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, str(SCRIPT), "--work", str(tmp_path / "w"), "--out", str(out), *SMALL, *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() and not (tmp_path / "w").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where no GPU is visible")
def test_cuda_without_a_gpu_is_refused(comfy, tmp_path):
    cmd = [sys.executable, str(SCRIPT), "--work", str(tmp_path / "w"), "--out", str(tmp_path / "m.safetensors"), *SMALL,
           "--device", "cuda"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "sees no CUDA GPU; use --device cpu" in proc.stderr, proc.stderr[-2000:]
