"""Stage 4 of the toy model's training: UNet and text encoder together, and the model file.

SD1.5's ε schedule on the cached latents, offset noise (without it flat backgrounds come out as off-palette
mixtures: the schedule's last step still carries the image mean), caption dropout for classifier-free
guidance, an EMA of the weights, and the attribute loss of stage 3 kept on at a small weight so the words stay
apart while the UNet learns to use them. Checkpoints (weights, EMA, AdamW moments) are written atomically
every few minutes; every step draws from its own seeded stream, so a resumed run equals a straight one (bit for
bit on a CPU; GPU arithmetic is not bit-reproducible).

An optional **detail phase** (``--detail-steps``) follows the main schedule: a warm restart of the learning rate
with the text encoder frozen (its file weights stay bit-identical, so anything trained against it stays valid)
and the ε loss weighted up on the object's and the decorations' latent cells, where the small parts that make
an instance live and a plain mean over 16×16 cells gives them a few percent of the gradient.
"""

from __future__ import annotations

import json
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from .train_io import Ema, cell_weights, fmt_eta, load_st, log, save_atomic
from .train_text import AttributeHeads, CaptionTokens, caption_batch, encode, pretrain_text

OPT_FORMAT = "2"  # how AdamW moments are named in unet_ckpt.safetensors (by parameter index)


def unet_config(args) -> dict:
    """The toy UNet's architecture: ``model.UNET_CONFIG`` with the ``--unet-config`` JSON overrides."""
    from dci.toyworld import model as tm

    cfg = dict(tm.UNET_CONFIG)
    if args.unet_config:
        extra = json.loads(args.unet_config)
        unknown = sorted(set(extra) - set(cfg))
        if unknown:
            raise SystemExit(f"--unet-config: unknown keys {unknown}; known: {sorted(cfg)}")
        cfg.update(extra)
    return cfg


def train_unet(specs, latents: torch.Tensor, taesd, args, work: Path):
    """Stages 3 and 4; returns (diffusion model, clip, ema, seconds, (main, detail) steps of the schedule), or
    None when the run stopped at ``--stop-at`` (checkpointed; the same command without it resumes)."""
    from dci.toyworld import model as tm

    torch.manual_seed(args.seed + 2)
    text_cfg, unet_cfg = dict(tm.TEXT_CONFIG), unet_config(args)
    base = tm.build_unet(unet_cfg, text_cfg["hidden_size"])
    clip = tm.build_clip(text_cfg)
    dm = base.diffusion_model
    encoder = clip.cond_stage_model.clip_l
    te = encoder.transformer
    tm.init_weights(dm)
    tm.init_weights(te)
    tokens = CaptionTokens(clip)
    heads = AttributeHeads(text_cfg["hidden_size"])
    device = torch.device(getattr(args, "device", "cpu"))
    dm.to(device)
    te.to(device)
    heads.to(device)
    for p in list(dm.parameters()) + list(te.parameters()):
        p.requires_grad_(True)
    dm.train()
    te.train()
    ckpt = work / "unet_ckpt.safetensors"
    unet_from = getattr(args, "unet_from", None)
    if unet_from is None:  # a UNet taken from a file brings its text encoder along (and a resume its checkpoint)
        pretrain_text(specs, encoder, heads, tokens, args, work)
    named = [("unet." + k, p) for k, p in dm.named_parameters()] + [
        ("text." + k, p) for k, p in te.named_parameters()
    ]
    if args.text_aux > 0:
        named += [("heads." + k, p) for k, p in heads.named_parameters()]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.999))
    ema = Ema(named, args.ema)
    alphas_cumprod = (1.0 / (1.0 + base.model_sampling.sigmas.float() ** 2)).to(device)
    latents = latents.to(device)
    main_steps, detail_steps = args.unet_steps, getattr(args, "detail_steps", 0)
    budget = getattr(args, "unet_minutes", 0.0)
    sized = False  # the schedule was set by a time budget (this run's or a resumed one's)
    start, elapsed_before = 0, 0.0
    if ckpt.exists():
        sd, meta = load_st(ckpt)
        if json.loads(meta.get("unet_config", "null") or "null") not in (None, unet_cfg):
            raise SystemExit(f"{ckpt} was trained with UNet {meta['unet_config']}, not {json.dumps(unet_cfg)}")
        if meta.get("opt_format") != OPT_FORMAT:
            raise SystemExit(f"{ckpt}: optimizer state of an older format; start a new work folder")
        ema.load_checkpoint(sd, opt)
        start, elapsed_before = int(meta["step"]), float(meta["elapsed"])
        log(f"UNet: resumed at step {start}")
        if "sized_steps" in meta:  # the schedule a time budget fixed stays fixed, with or without the option
            main_steps, detail_steps = json.loads(meta["sized_steps"])
            budget, sized = 0.0, True
            log(f"UNet: the time budget set {main_steps} + {detail_steps} steps")
    elif unet_from is not None:
        start = weights_from_file(unet_from, dm, te, unet_cfg, args)
        ema.reset_to_weights()

    if budget and start >= main_steps:
        log("UNet: --unet-minutes ignored: this run resumes inside the detail phase of a schedule set without it")
        budget = 0.0
    timing = (start + TIMING[0], start + TIMING[1])  # a time budget times these steps of this run
    if budget:  # provisional until the timing is done; never fewer main steps than the timing runs
        main_steps = max(main_steps, timing[1])
    total = main_steps + detail_steps
    log(f"UNet params {tm.count_parameters(dm):,}, text params {tm.count_parameters(te):,}; {main_steps} + "
        f"{detail_steps} detail steps, batch {args.batch}")
    cells = None
    if detail_steps and start < total:
        cells = torch.stack([cell_weights(s, args.detail_object_weight, args.detail_decoration_weight)
                             for s in specs]).unsqueeze(1).to(device)  # [N, 1, 16, 16]
    t0, run, run_aux, last_ckpt = time.time(), None, None, time.time()
    warmup = 200
    timed = 0.0  # when the budget's timing window started
    step = start
    while step < total:
        detail = step >= main_steps
        if step == max(start, main_steps):  # the first detail step of this run
            for k, p in named:
                if not k.startswith("unet."):  # text encoder and heads: frozen from here on
                    p.requires_grad_(False)
        rng = np.random.default_rng([args.seed, step])  # per-step stream: resuming reproduces the run
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx, ids, labels = caption_batch(specs, rng, tokens, args.batch, args.caption_dropout)
        rows = torch.from_numpy(idx).to(device)
        ids, labels = ids.to(device), labels.to(device)
        x0 = latents[rows]
        noise = torch.randn(x0.shape, generator=g)
        noise = noise + args.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
        noise = noise.to(device)
        t = torch.randint(0, len(alphas_cumprod), (args.batch,), generator=g).to(device)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        if detail:  # warm restart: its own warm-up and cosine
            lr = warm_cosine(args.detail_lr, step - main_steps, detail_steps, 100)
        else:
            lr = warm_cosine(args.lr, step, main_steps, warmup)
        for grp in opt.param_groups:
            grp["lr"] = lr
        with torch.no_grad() if detail else nullcontext():
            ctx = encode(encoder, ids)
        err = (dm(xt, t.float(), context=ctx) - noise) ** 2
        if detail:
            w = cells[rows]
            loss = (err * w).mean() / w.mean()
        else:
            loss = err.mean()
        aux = heads.loss(ctx, ids, labels) if args.text_aux > 0 and not detail else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (loss + args.text_aux * aux).backward()
        torch.nn.utils.clip_grad_norm_([p for p in params if p.requires_grad], 1.0)
        opt.step()
        ema.update(step)  # a frozen text encoder keeps its average (the file's weights) unchanged
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        run_aux = aux.item() if run_aux is None else 0.98 * run_aux + 0.02 * aux.item()

        done = step + 1
        step = done
        if budget and done == timing[0]:
            timed = time.time()
        elif budget and done == timing[1]:
            main_steps, detail_steps = sized_steps(budget, (time.time() - timed) / (timing[1] - timing[0]), done,
                                                   args.unet_steps, getattr(args, "detail_steps", 0))
            total, budget, sized = main_steps + detail_steps, 0.0, True
            log(f"UNet: sized to {main_steps} + {detail_steps} steps for {args.unet_minutes:g} minutes")
        if done % 25 == 0 or done == total:
            per = (time.time() - t0) / (done - start)
            log(f"UNet step {done}/{total} loss {run:.4f} text {run_aux:.4f} lr {lr:.2e} {per:.3f}s/step "
                f"eta {fmt_eta(per * (total - done))}")
        stop = bool(args.stop_at) and done >= args.stop_at and done < total
        if time.time() - last_ckpt > args.ckpt_minutes * 60 or done == total or stop:
            seconds = elapsed_before + time.time() - t0
            tensors = ema.checkpoint_tensors(opt)
            meta = {"step": str(done), "elapsed": str(seconds), "opt_format": OPT_FORMAT,
                    "unet_config": json.dumps(unet_cfg)}
            if sized:
                meta["sized_steps"] = json.dumps([main_steps, detail_steps])
            save_atomic(tensors, ckpt, meta)
            write_model(dm, clip, taesd, ema, args, work / "toyworld_latest.safetensors", done, seconds,
                        (main_steps, detail_steps))
            last_ckpt = time.time()
            log(f"checkpoint at step {done}")
        if stop:
            log(f"stopped at step {done} of {total}; the same command without --stop-at resumes")
            return None
    return dm, clip, ema, elapsed_before + time.time() - t0, (main_steps, detail_steps)


# A time budget times a run's steps 10-40 (after its first ones, which warm caches and kernels up).
TIMING = (10, 40)


def sized_steps(minutes: float, per_step: float, done: int, main: int, detail: int) -> tuple[int, int]:
    """Main and detail steps that take about ``minutes`` at ``per_step`` seconds, in the ratio main : detail;
    never fewer main steps than the ``done`` already run."""
    total = max(done, int(minutes * 60 / per_step))
    new_main = max(done, round(total * main / (main + detail)))
    new_detail = max(1 if detail else 0, total - new_main)
    return new_main, new_detail


def weights_from_file(path: Path, dm, te, unet_cfg: dict, args) -> int:
    """Loads UNet and text encoder weights from a toy-world file, for a detail phase on a finished
    model whose work folder is gone; returns the step to start at (the end of the main schedule). AdamW's
    moments start fresh, which the detail phase's own warm-up absorbs."""
    from dci.toyworld import model as tm

    meta = tm.read_metadata(path)
    if json.loads(meta.get("toyworld.unet_config", "null")) != unet_cfg:
        raise SystemExit(f"--unet-from {path}: its UNet is {meta.get('toyworld.unet_config')}, "
                         f"not {json.dumps(unet_cfg)}")
    sd, _ = load_st(path)
    with torch.no_grad():
        for prefix, mod in ((tm._PREFIX_UNET, dm), (tm._PREFIX_CLIP + "clip_l.transformer.", te)):
            part = {k[len(prefix):]: v.float() for k, v in sd.items() if k.startswith(prefix)}
            missing, unexpected = mod.load_state_dict(part, strict=False)
            if unexpected or [k for k in missing if "position_ids" not in k]:
                raise SystemExit(f"--unet-from {path}: weights don't match (missing {missing[:3]}, "
                                 f"unexpected {unexpected[:3]})")
    log(f"UNet and text encoder taken from {path}; detail phase from step {args.unet_steps}")
    return args.unet_steps


def warm_cosine(peak: float, step: int, steps: int, warmup: int) -> float:
    """The learning rate at ``step`` of ``steps``: linear warm-up to ``peak``, then a cosine down to a tenth."""
    lr = peak * min(1.0, (step + 1) / warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / steps)))


def write_model(dm, clip, taesd, ema: Ema, args, path: Path, steps: int, seconds: float,
                split: tuple[int, int] | None = None) -> None:
    """The shipped file: EMA weights of UNet and text encoder plus the VAE, fp16, with metadata; ``split``:
    the (main, detail) steps of the schedule when they differ from the arguments' (a time budget's)."""
    from dci.toyworld import model as tm
    from dci.toyworld.render import WORLD_VERSION

    with ema.applied():
        sd = tm.state_dict_for_file(dm, clip.cond_stage_model, taesd)
    recipe = ("seed", "batch", "images", "vae_steps", "decoder_steps", "lr", "offset_noise", "caption_dropout",
              "text_steps", "text_aux", "unet_steps", "detail_steps", "detail_lr", "detail_object_weight",
              "detail_decoration_weight", "unet_minutes")
    extra = {"world_version": WORLD_VERSION, "steps": steps, "train_seconds": round(seconds, 1),
             "vae_from": args.vae_from.name if args.vae_from else "",
             "unet_from": args.unet_from.name if getattr(args, "unet_from", None) else "",
             "prediction": "eps", "zsnr": "false"}
    extra.update({k: getattr(args, k, 0) for k in recipe})
    if split is not None and tuple(split) != (args.unet_steps, getattr(args, "detail_steps", 0)):
        # a time budget set the schedule: the steps that ran, and what the command asked (its warm-up steps
        # ran under the asked schedule, so the command reproduces the file, the recorded steps alone don't)
        extra["unet_steps"], extra["detail_steps"] = split
        extra["asked_steps"] = [args.unet_steps, getattr(args, "detail_steps", 0)]
    extra["device"] = str(getattr(args, "device", "cpu"))
    meta = tm.file_metadata(tm.TEXT_CONFIG, unet_config(args), extra)
    save_atomic(sd, path, meta)
