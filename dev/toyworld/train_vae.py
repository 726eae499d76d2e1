"""Stages 1-2 of the toy model's training: the scenes, the TAESD-architecture VAE and the decoder refinement.

The VAE trains mostly on crops (convolutions don't care about image size; crops around objects are where the
detail is), then on whole images; its ``vae_scale``/``vae_shift`` are fitted so that 0.18215 × latents have
unit std, and every scene's latents are cached for the UNet stage. The optional decoder refinement trains the
decoder alone on those latents with the pattern's and emblem's pixels weighted up: the encoder, the cached
latents and a UNet trained on them stay valid, so it may run before, after or beside the UNet stage.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from .train_io import fmt_eta, load_optimizer_tensors, load_st, log, optimizer_tensors, save_atomic


def render_data(n: int, seed: int):
    from dci.toyworld.render import render_scene, sample_scenes
    from dev.toyworld.concepts import concept_looks

    specs = sample_scenes(n, seed, excluded_looks=concept_looks())
    images = np.stack([render_scene(s) for s in specs])
    return specs, images


# ------------------------------------------------------------------------------------------ stage 2


def image_size() -> int:
    from dci.toyworld.render import IMAGE_SIZE

    return IMAGE_SIZE


def object_weights(specs) -> torch.Tensor:
    """Per-pixel loss weights [N,S,S]: object pixels count 5×, so small objects and emblems aren't drowned out."""
    from dci.toyworld.render import object_pixels

    return torch.from_numpy(np.stack([object_pixels(s) for s in specs])).to(torch.uint8)


def object_crops(data: torch.Tensor, mask: torch.Tensor, specs, idx: np.ndarray, size: int, rng):
    """Crops of ``size`` px aligned to the 8-px latent grid, on the object 85 % of the time.

    Object crops centre on a random point within the object's half-extent of its centre, so edges, the
    emblem and the inside all come up. Returns images in 0..1 [B,3,s,s], loss weights [B,1,s,s] (object
    pixels 5×) and the (x, y) origins in pixels.
    """
    from dci.toyworld.render import SIZE_RADIUS, object_centre

    full = data.shape[-1]
    xs, ws, origins = [], [], []
    hi = full - size
    for i in idx:
        if rng.random() < 0.85:
            cx, cy = object_centre(specs[i].obj)
            r = SIZE_RADIUS[specs[i].obj.size]
            cx, cy = cx + rng.uniform(-r, r), cy + rng.uniform(-r, r)
        else:
            cx, cy = rng.uniform(0, full, 2)
        ox = int(np.clip(round((cx - size / 2) / 8) * 8, 0, hi))
        oy = int(np.clip(round((cy - size / 2) / 8) * 8, 0, hi))
        xs.append(data[i, :, oy : oy + size, ox : ox + size])
        ws.append(mask[i, oy : oy + size, ox : ox + size])
        origins.append((ox, oy))
    return torch.stack(xs).float() / 255.0, torch.stack(ws)[:, None].float() * 4 + 1, origins


def weighted_loss(rec: torch.Tensor, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Weighted L2 + 0.1 L1, normalised by the weights."""
    err = rec - x
    return (w * (err**2 + 0.1 * err.abs())).sum() / (w.sum() * 3)


def encode_raw(taesd, data: torch.Tensor) -> torch.Tensor:
    """The encoder's own output for uint8 images [N,3,S,S] (on the CPU), in chunks of 32 on the encoder's device."""
    dev = next(taesd.taesd_encoder.parameters()).device
    return torch.cat([taesd.taesd_encoder(data[i : i + 32].to(dev).float() / 255.0).cpu()
                      for i in range(0, len(data), 32)])


# (crop size, batch, share of the VAE steps): mostly cheap crops (convolutions don't care about image size;
# 32×32 is 4×4 latent cells, enough to hold an emblem or a stretch of edge), then larger crops, then whole
# images so the borders and the encoder's wide receptive field see real scenes.
VAE_PHASES = ((32, 32, 0.7), (64, 8, 0.2), (128, 2, 0.1))


def vae_phase(step: int, total: int) -> tuple[int, int]:
    done = 0.0
    for size, bs, share in VAE_PHASES:
        done += share
        if step < round(done * total):
            return min(size, image_size()), bs
    return min(VAE_PHASES[-1][0], image_size()), VAE_PHASES[-1][1]


def train_vae(specs, images: np.ndarray, args, work: Path):
    """TAESD trained with weighted L2 on crops, then scale/shift fitted; returns (taesd, latents [N,4,s,s]).

    Checkpointed every ``--ckpt-minutes`` (weights and Adam moments), so a killed run resumes where it
    stopped and gives the same weights as a straight one.
    """
    from dci.toyworld import model as tm

    path = work / "vae.safetensors"
    taesd = tm.build_taesd()
    if path.exists():
        sd, _ = load_st(path)
        latents = sd.pop("_latents")
        taesd.load_state_dict(sd)
        log(f"VAE: resumed from {path}")
        return taesd, latents
    if args.vae_from:
        return vae_from_file(images, taesd, args.vae_from, work, torch.device(getattr(args, "device", "cpu")))

    torch.manual_seed(args.seed)
    tm.init_weights(taesd)
    taesd.train()
    named = [("enc." + k, p) for k, p in taesd.taesd_encoder.named_parameters()]
    named += [("dec." + k, p) for k, p in taesd.taesd_decoder.named_parameters()]
    params = [p for _, p in named]
    opt = torch.optim.Adam(params, lr=args.vae_lr)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 [N,3,S,S]
    mask = object_weights(specs)
    ckpt = work / "vae_ckpt.safetensors"
    start = 0
    if ckpt.exists():
        sd, meta = load_st(ckpt)
        with torch.no_grad():
            for k, p in named:
                p.copy_(sd["w." + k])
        load_optimizer_tensors(opt, sd, "opt.")
        start = int(meta["step"])
        log(f"VAE: resumed at step {start}")
    t0, run, last_ckpt = time.time(), None, time.time()
    warmup = 100
    for step in range(start, args.vae_steps):
        rng = np.random.default_rng([args.seed, 1, step])  # per-step stream: resuming reproduces the run
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        lr = args.vae_lr * min(1.0, (step + 1) / warmup)
        lr *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.vae_steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        size, bs = vae_phase(step, args.vae_steps)
        idx = rng.integers(0, len(data), bs)
        x, w, _ = object_crops(data, mask, specs, idx, size, rng)
        z = taesd.taesd_encoder(x)
        z = z + 0.03 * torch.randn(z.shape, generator=g)  # decoder tolerant of imperfect latents
        rec = taesd.taesd_decoder(z)
        loss = weighted_loss(rec, x, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        done = step + 1
        if done % 50 == 0 or done == args.vae_steps:
            el = time.time() - t0
            per = el / (done - start)
            log(
                f"VAE step {done}/{args.vae_steps} crop {size} loss {run:.5f} lr {lr:.2e} "
                f"{per:.3f}s/step eta {fmt_eta(per * (args.vae_steps - done))}"
            )
        if time.time() - last_ckpt > args.ckpt_minutes * 60 and done < args.vae_steps:
            tensors = {"w." + k: p for k, p in named}
            tensors.update(optimizer_tensors(opt, "opt."))
            save_atomic(tensors, ckpt, {"step": str(done)})
            last_ckpt = time.time()
            log(f"VAE checkpoint at step {done}")

    taesd.eval()
    with torch.no_grad():
        raw = encode_raw(taesd, data)
        std, mean = raw.std().item(), raw.mean().item()
        scale = tm.LATENT_SCALE * std
        taesd.vae_scale.fill_(scale)
        taesd.vae_shift.fill_(-mean / scale)
        latents = tm.LATENT_SCALE * (raw / taesd.vae_scale + taesd.vae_shift)
        rec = torch.cat([taesd.taesd_decoder(raw[i : i + 32]) for i in range(0, min(len(raw), 256), 32)]).clamp(0, 1)
        psnr = -10 * math.log10(((rec - data[: len(rec)].float() / 255.0) ** 2).mean().item())
    log(
        f"VAE: raw latent mean {mean:.3f} std {std:.3f}; per-channel UNet-latent std "
        f"{[round(v, 3) for v in latents.std(dim=(0, 2, 3)).tolist()]}; PSNR {psnr:.2f} dB"
    )
    save_atomic({**taesd.state_dict(), "_latents": latents}, path, {"psnr": f"{psnr:.2f}"})
    return taesd, latents


def vae_from_file(images: np.ndarray, taesd, source: Path, work: Path, device: torch.device | None = None):
    """The VAE of an existing toy-world file (its fitted scale/shift included) and the latents it gives,
    encoded on ``device`` (the VAE and the latents come back on the CPU).

    Writes the work folder's VAE and decoder files, so that the later stages and resumes see a finished
    VAE stage.
    """
    from dci.toyworld import model as tm

    sd, _ = load_st(source)
    vae_sd = {k[len(tm._PREFIX_VAE) :]: v.float() for k, v in sd.items() if k.startswith(tm._PREFIX_VAE)}
    if not vae_sd:
        raise SystemExit(f"--vae-from {source}: no VAE weights ({tm._PREFIX_VAE}*) in that file")
    taesd.load_state_dict(vae_sd)
    taesd.eval()
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    with torch.no_grad():
        raw = encode_raw(taesd.to(device or "cpu"), data)
        taesd.cpu()
        latents = tm.LATENT_SCALE * (raw / taesd.vae_scale + taesd.vae_shift)
    log(f"VAE: taken from {source}; UNet-latent std {latents.std().item():.3f}")
    save_atomic({**taesd.state_dict(), "_latents": latents}, work / "vae.safetensors", {"from": str(source)})
    save_atomic(dict(taesd.taesd_decoder.state_dict()), work / "decoder.safetensors", {"from": str(source)})
    return taesd, latents


def decoration_weights(specs) -> torch.Tensor:
    """Per-pixel flags [N,S,S] of the pattern and emblem pixels (uint8)."""
    from dci.toyworld.render import decoration_pixels

    return torch.from_numpy(np.stack([decoration_pixels(s) for s in specs])).to(torch.uint8)


def refine_decoder(specs, images: np.ndarray, latents: torch.Tensor, taesd, args, work: Path) -> None:
    """Trains the decoder alone on the cached latents, with object pixels weighted 5× and the pattern's and
    emblem's pixels another 4× (the small parts that make an instance).

    The encoder stays frozen, so the cached latents, and a UNet trained on them, stay valid: this stage
    doesn't change what the UNet stage computes and may run before it, after it or beside it. Crops as in
    the VAE stage (``VAE_PHASES``); checkpointed every ``--ckpt-minutes``.
    """
    from dci.toyworld import model as tm

    path = work / "decoder.safetensors"
    if path.exists():
        sd, _ = load_st(path)
        taesd.taesd_decoder.load_state_dict(sd)
        log(f"decoder: resumed from {path}")
        return
    if args.decoder_steps <= 0:
        return
    with torch.no_grad():
        raw = (latents / tm.LATENT_SCALE - taesd.vae_shift) * taesd.vae_scale  # the encoder's own output
    mask = object_weights(specs)
    detail = decoration_weights(specs)
    data = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
    dec = taesd.taesd_decoder
    dec.train()
    named = list(dec.named_parameters())
    opt = torch.optim.Adam([p for _, p in named], lr=args.decoder_lr)
    ckpt = work / "decoder_ckpt.safetensors"
    start = 0
    if ckpt.exists():
        sd, meta = load_st(ckpt)
        with torch.no_grad():
            for k, p in named:
                p.copy_(sd["w." + k])
        load_optimizer_tensors(opt, sd, "opt.")
        start = int(meta["step"])
        log(f"decoder: resumed at step {start}")
    t0, run, last_ckpt = time.time(), None, time.time()
    for step in range(start, args.decoder_steps):
        rng = np.random.default_rng([args.seed, 4, step])
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        lr = args.decoder_lr * min(1.0, (step + 1) / 50)
        lr *= 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.decoder_steps))
        for grp in opt.param_groups:
            grp["lr"] = lr
        size, bs = vae_phase(step, args.decoder_steps)
        idx = rng.integers(0, len(data), bs)
        x, w, origins = object_crops(data, mask, specs, idx, size, rng)
        extra = torch.stack([detail[i, oy : oy + size, ox : ox + size] for i, (ox, oy) in zip(idx, origins, strict=True)])
        w = w + 4 * extra[:, None].float()
        z = torch.stack(
            [raw[i, :, oy // 8 : (oy + size) // 8, ox // 8 : (ox + size) // 8] for i, (ox, oy) in zip(idx, origins, strict=True)]
        )
        rec = dec(z + 0.03 * torch.randn(z.shape, generator=g))
        loss = weighted_loss(rec, x, w)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        done = step + 1
        if done % 50 == 0 or done == args.decoder_steps:
            el = time.time() - t0
            per = el / (done - start)
            log(
                f"decoder step {done}/{args.decoder_steps} crop {size} loss {run:.5f} lr {lr:.2e} {per:.3f}s/step "
                f"eta {fmt_eta(per * (args.decoder_steps - done))}"
            )
        if time.time() - last_ckpt > args.ckpt_minutes * 60 and done < args.decoder_steps:
            tensors = {"w." + k: p for k, p in named}
            tensors.update(optimizer_tensors(opt, "opt."))
            save_atomic(tensors, ckpt, {"step": str(done)})
            last_ckpt = time.time()
            log(f"decoder checkpoint at step {done}")
    dec.eval()
    save_atomic(dict(dec.state_dict()), path, {"steps": str(args.decoder_steps)})
