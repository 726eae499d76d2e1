"""Trains the toy world's base model from scratch on the CPU and writes one fp16 safetensors file.

Stages, each resumable from the work folder (default ``~/.cache/comfyui-dci/toyworld-work``, where a later run
finds it):
1. render the training scenes (seeded; never a concept's full look) — ``train_vae.render_data``;
2. train the TAESD-architecture VAE on crops, then whole images; fit its scale and shift; cache the latents;
   then refine the decoder alone with the pattern's and emblem's pixels weighted up (``--decoder-steps``) —
   ``train_vae``;
3. pre-train the text encoder to read the captions' attributes (``--text-steps``) — ``train_text``;
4. train UNet and text encoder together on the cached latents (``--unet-steps``) — ``train_unet``.

The decoder refinement changes nothing the UNet stage computes (the encoder and the latents stay fixed), so a
run may do it in a second process with its own work folder and copy ``decoder.safetensors`` in before the
final resume; the result is the same file.

``--vae-from FILE`` takes the VAE of an existing toy-world file instead of training one (stage 2 is then only
the latent cache).
``--unet-from FILE --detail-steps N`` takes UNet and text encoder from an existing toy-world file and runs only
the detail phase on them (the file's own work folder is not needed; AdamW starts fresh under the phase's warm-up).

``--device cuda`` runs the text and UNet stages on a GPU, and with ``--vae-from`` the latent caching too (the
random streams stay on the CPU, so a run draws the same batches and noise on either device; GPU arithmetic is not
bit-reproducible, TF32 is on); VAE training and the decoder refinement stay on the CPU.
``--unet-minutes M`` sizes the UNet stage to a time budget: it times its steps 10-40, then sets the number of
main and detail steps so that the stage takes about M minutes, in the ratio of ``--unet-steps`` to
``--detail-steps`` (timed on main steps; detail steps are a little cheaper, so a run ends a little early). The
schedule is fixed from step 40 on, inside the warm-up; a resume keeps it, and the file records the asked and the
run steps.

Usage: python3 dev/host.py python -m dev.toyworld.train_base [--work DIR] [--out FILE] [--unet-steps N] ...
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run as a file rather than with -m
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "assets" / "toyworld" / "toyworld_base.safetensors"
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comfyui-dci" / "toyworld-work"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT,
                    help="the model file; an existing file is replaced only with --overwrite")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK,
                    help="checkpoints of every stage; a later run with the same folder resumes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--images", type=int, default=8000)
    ap.add_argument("--vae-steps", type=int, default=3200)
    ap.add_argument("--vae-lr", type=float, default=1e-3)
    ap.add_argument("--decoder-steps", type=int, default=6000, help="decoder-only refinement (0: skip)")
    ap.add_argument("--decoder-lr", type=float, default=5e-4)
    ap.add_argument("--vae-from", type=Path, default=None,
                    help="take the VAE from this toy-world file instead of training one")
    ap.add_argument("--text-steps", type=int, default=300,
                    help="text-encoder pre-training steps on the captions' attributes (0: skip)")
    ap.add_argument("--text-lr", type=float, default=1e-3)
    ap.add_argument("--text-aux", type=float, default=0.1,
                    help="weight of the attribute loss kept on during UNet training (0: off)")
    ap.add_argument("--unet-steps", type=int, default=7000)
    ap.add_argument("--unet-config", default="",
                    help='JSON overrides of the UNet architecture (keys of dci.toyworld.model.UNET_CONFIG), '
                         'e.g. \'{"model_channels": 96}\'')
    ap.add_argument("--detail-steps", type=int, default=0,
                    help="UNet steps after --unet-steps with the text encoder frozen, a restarted lr and the loss "
                         "weighted up on object and decoration cells (0: none)")
    ap.add_argument("--unet-from", type=Path, default=None,
                    help="with --detail-steps: take UNet and text encoder from this toy-world file and run only "
                         "the detail phase (for a finished model whose work folder is gone)")
    ap.add_argument("--detail-lr", type=float, default=2e-4)
    ap.add_argument("--detail-object-weight", type=float, default=2.0)
    ap.add_argument("--detail-decoration-weight", type=float, default=6.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--offset-noise", type=float, default=0.1)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--stop-at", type=int, default=0,
                    help="stop after this UNet step with a checkpoint, without writing --out (0: run to the end)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu",
                    help="where the text and UNet stages and the latent caching run: cpu (default) or cuda[:N]")
    ap.add_argument("--unet-minutes", type=float, default=0.0,
                    help="size the UNet stage (main + detail steps, in their given ratio) to about this many "
                         "minutes, timed on its first steps (0: the given step counts)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out.exists() and not args.overwrite:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it, or another --out")
    if args.unet_from is not None and not args.detail_steps:
        raise SystemExit("--unet-from continues a finished model: give --detail-steps too")
    if args.unet_minutes < 0:
        raise SystemExit("--unet-minutes must be >= 0")
    if args.unet_minutes and args.unet_from is not None:
        raise SystemExit("--unet-minutes sizes a whole UNet schedule; with --unet-from give --detail-steps instead")
    from dev.toyworld.train_unet import TIMING  # torch and numpy only: no ComfyUI import yet

    if args.unet_minutes and args.unet_steps < TIMING[1]:
        raise SystemExit(f"--unet-minutes times the UNet's steps {TIMING[0]}-{TIMING[1]}: give --unet-steps "
                         f"{TIMING[1]} or more (the ratio of --unet-steps to --detail-steps is what counts)")
    if args.unet_from is not None and not args.unet_from.is_file():
        raise SystemExit(f"--unet-from {args.unet_from}: no such file")
    try:
        device = torch.device(args.device)
    except RuntimeError as e:
        raise SystemExit(f"--device {args.device}: {e}") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {args.device}: this torch sees no CUDA GPU; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise SystemExit(f"--device {args.device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    elif device.type != "cpu":
        raise SystemExit(f"--device {args.device}: only cpu and cuda are supported")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from dev import harness

    harness.configure()
    from dev.toyworld.train_io import log
    from dev.toyworld.train_unet import train_unet, write_model
    from dev.toyworld.train_vae import refine_decoder, render_data, train_vae

    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log(f"args {json.dumps({k: str(v) for k, v in vars(args).items()})}")
    specs, images = render_data(args.images, args.seed)
    log(f"rendered {len(specs)} scenes")
    taesd, latents = train_vae(specs, images, args, args.work)
    refine_decoder(specs, images, latents, taesd, args, args.work)
    trained = train_unet(specs, latents, taesd, args, args.work)
    if trained is None:
        return
    dm, clip, ema, _, split = trained
    write_model(dm, clip, taesd, ema, args, args.out, sum(split), time.time() - t_start, split)
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {(time.time() - t_start) / 60:.1f} min")


if __name__ == "__main__":
    main()
