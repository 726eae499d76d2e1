"""Trains the toy world's base model from scratch on the CPU and writes one fp16 safetensors file.

Stages (each resumable from the work folder):
1. render the training scenes (seeded);
2. train the TAESD-architecture VAE, mostly on 24×24 crops around the objects (cheap: convolutions don't
   care about image size) with object pixels weighted up, then on whole images; then fit
   ``vae_scale``/``vae_shift`` so that 0.18215 × latents have unit std, and cache all latents;
   optionally polish the decoder alone (``--decoder-steps``; the encoder and latents stay fixed);
3. pre-train the text encoder alone to read the captions' attributes (``--text-steps``): linear heads on
   its end-of-text and padding outputs (the tokens the UNet's cross-attention mostly looks at) classify
   shape, colours, size, pattern, position, background and texture, each with a "not said" class. Jointly
   trained from scratch without it, the encoder's output barely told "left" from "right" (a 0.7 difference
   on 7.8-norm token vectors, against 4-12 for a colour word), so the UNet had nothing to place objects by
   and, having no use for the words, sent no gradient that would separate them;
4. train UNet and text encoder jointly on the cached latents with SD1.5's ε schedule, offset noise,
   caption dropout, an EMA of the weights and the attribute loss kept on (``--text-aux``, so the words stay
   apart while the UNet learns to use them); checkpoints are written atomically every few minutes;
5. optionally (``--layout-steps``) go on with a warm-restarted schedule aimed at the high-noise steps
   where layout is decided: a (1 + σ²)-weighted ε-loss, coarse noise (``--layout-pyramid``), or
   v-prediction on the zero-terminal-SNR schedule (``--layout-prediction v --layout-zsnr``; the written
   file then says so in its metadata and DCI Toy World Loader builds a v-prediction, zsnr model).
   The shipped model does not use it: see the README for what it did and did not change.

``--vae-from FILE`` takes the VAE of an existing toy-world file instead of training one (stage 2 is then
only the latent cache).

Usage: python scripts/toyworld/train_base.py [--comfyui PATH] [--unet-steps N] ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OUT = REPO / "assets" / "toyworld" / "toyworld_base.safetensors"
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comfyui-dci" / "toyworld-work"
OPT_FORMAT = "2"  # how AdamW moments are named in unet_ckpt.safetensors


def setup_comfy(comfyui: str) -> None:
    """Puts ComfyUI on the path in CPU mode (must run before anything imports model_management)."""
    # ComfyUI first: its top-level ``nodes`` module must win over this repo's ``nodes`` package.
    sys.path.insert(0, str(REPO))
    sys.path.insert(0, comfyui)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def fmt_eta(seconds: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(time.time() + seconds))


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, meta: dict[str, str]) -> None:
    """safetensors write to ``path.tmp`` then rename, so a killed run never leaves a torn file."""
    from safetensors.torch import save_file

    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)


def load_st(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata() or {})
    return load_file(str(path)), meta


def optimizer_tensors(opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """Flattens AdamW state into named tensors (no pickles in checkpoints)."""
    out = {}
    for pid, st in opt.state_dict()["state"].items():  # keyed by parameter index, not insertion order
        for k, v in st.items():
            out[f"{prefix}{pid}.{k}"] = v if torch.is_tensor(v) else torch.tensor(v)
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], prefix: str) -> None:
    """Inverse of ``optimizer_tensors``."""
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, v in tensors.items():
        if key.startswith(prefix):
            i, name = key[len(prefix) :].split(".", 1)
            state.setdefault(int(i), {})[name] = v
    sd["state"] = state
    opt.load_state_dict(sd)


# ------------------------------------------------------------------------------------------ stage 1


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
    """The encoder's own output for uint8 images [N,3,S,S], in chunks of 32."""
    return torch.cat([taesd.taesd_encoder(data[i : i + 32].float() / 255.0) for i in range(0, len(data), 32)])


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
        return vae_from_file(images, taesd, args.vae_from, work)

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


def vae_from_file(images: np.ndarray, taesd, source: Path, work: Path):
    """The VAE of an existing toy-world file (its fitted scale/shift included) and the latents it gives.

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
        raw = encode_raw(taesd, data)
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


# ------------------------------------------------------------------------------------------ stage 3


class CaptionTokens:
    """Caches token ids of captions: the Python BPE tokenizer is slow and captions repeat a lot."""

    def __init__(self, clip):
        self.clip = clip
        self.cache: dict[str, list[int]] = {}

    def __call__(self, text: str) -> list[int]:
        if text not in self.cache:
            pairs = self.clip.tokenize(text)["l"][0]
            self.cache[text] = [int(t) for t, _ in pairs]
        return self.cache[text]


# The attributes a caption can name and their classes; class 0 of each head is "the caption doesn't say".
def attribute_classes() -> dict[str, tuple[str, ...]]:
    from dci.toyworld import render as r

    return {
        "shape": r.SHAPES,
        "colour": r.COLOURS,
        "size": r.SIZES,
        "pattern": r.PATTERNS[1:],
        "pattern_colour": r.COLOURS,
        "emblem": r.EMBLEM_SHAPES,
        "emblem_colour": r.COLOURS,
        "position": r.POSITIONS,
        "background": r.COLOURS,
        "texture": ("gradient", "grid"),
    }


def caption_labels(text: str) -> list[int]:
    """One class index per attribute (``attribute_classes`` order), 0 where the caption says nothing."""
    from dci.toyworld.render import parse_caption

    asked = parse_caption(text)
    return [0 if asked[k] is None else 1 + names.index(asked[k]) for k, names in attribute_classes().items()]


class AttributeHeads(torch.nn.Module):
    """Linear read-outs of every attribute from the text encoder's output tokens (training only)."""

    def __init__(self, hidden: int):
        super().__init__()
        self.sizes = [len(v) + 1 for v in attribute_classes().values()]
        self.proj = torch.nn.Linear(hidden, sum(self.sizes))

    def loss(self, ctx: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over attributes, on the end-of-text token and the padding after it."""
        eos = (ids == 49407).int().argmax(dim=1)  # the SD1 tokenizer pads with end-of-text
        keep = torch.arange(ids.shape[1])[None, :] >= eos[:, None]  # [B, T]
        logits = self.proj(ctx[keep])  # [N, C]
        target = labels[:, None, :].expand(-1, ids.shape[1], -1)[keep]  # [N, A]
        parts = torch.split(logits, self.sizes, dim=1)
        return torch.stack(
            [torch.nn.functional.cross_entropy(part, target[:, i]) for i, part in enumerate(parts)]
        ).mean()

    def accuracy(self, ctx: torch.Tensor, ids: torch.Tensor, labels: torch.Tensor) -> list[float]:
        """Per-attribute accuracy read at the end-of-text token."""
        eos = (ids == 49407).int().argmax(dim=1)
        logits = self.proj(ctx[torch.arange(len(ids)), eos])
        parts = torch.split(logits, self.sizes, dim=1)
        return [(part.argmax(1) == labels[:, i]).float().mean().item() for i, part in enumerate(parts)]


def caption_batch(specs, rng, tokens: CaptionTokens, batch: int, dropout: float):
    """Token ids [B,77] and attribute labels [B,A] of ``batch`` random captions (empty ones at ``dropout``)."""
    from dci.toyworld.render import caption

    idx = rng.integers(0, len(specs), batch)
    texts = ["" if rng.random() < dropout else caption(specs[i], rng) for i in idx]
    ids = torch.tensor([tokens(t) for t in texts])
    labels = torch.tensor([caption_labels(t) for t in texts])
    return idx, ids, labels


def pretrain_text(specs, te, heads: AttributeHeads, tokens: CaptionTokens, args, work: Path) -> None:
    """Stage 3: the text encoder and the heads alone, on captions only (seconds per hundred steps)."""
    from dci.toyworld import model as tm

    path = work / "text.safetensors"
    if path.exists():
        sd, _ = load_st(path)
        te.load_state_dict({k[5:]: v for k, v in sd.items() if k.startswith("text.")})
        heads.load_state_dict({k[6:]: v for k, v in sd.items() if k.startswith("heads.")})
        log(f"text encoder: resumed from {path}")
        return
    if args.text_steps <= 0:
        return
    params = list(te.parameters()) + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=args.text_lr, weight_decay=0.01)
    t0 = time.time()
    for step in range(args.text_steps):
        rng = np.random.default_rng([args.seed, 3, step])
        _, ids, labels = caption_batch(specs, rng, tokens, 256, args.caption_dropout)
        for grp in opt.param_groups:
            grp["lr"] = args.text_lr * min(1.0, (step + 1) / 20)
        ctx = tm.text_hidden_states(te, te.get_input_embeddings()(ids))
        loss = heads.loss(ctx, ids, labels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == args.text_steps:
            with torch.no_grad():
                acc = heads.accuracy(ctx, ids, labels)
            names = list(attribute_classes())
            log(
                f"text step {step + 1}/{args.text_steps} loss {loss.item():.4f} "
                f"{(time.time() - t0) / (step + 1):.3f}s/step accuracy "
                + " ".join(f"{n} {a:.2f}" for n, a in zip(names, acc, strict=True))
            )
    tensors = {"text." + k: v for k, v in te.state_dict().items()}
    tensors.update({"heads." + k: v for k, v in heads.state_dict().items()})
    save_atomic(tensors, path, {"steps": str(args.text_steps)})


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


def pyramid_noise(noise: torch.Tensor, discount: float, g: torch.Generator) -> torch.Tensor:
    """Adds noise at 1/2, 1/4, ... of the latent size (weights discount, discount², ...), unit variance kept.

    With 8×8 latents, SD's schedule leaves an image's coarse layout readable in x_t even at the top timestep
    (a 4×4 block average has 1/4 of the noise), so the model learns to place objects where the noise
    happens to suggest instead of where the prompt says. Coarse noise hides that leak (the same reasoning
    as offset noise for the mean colour); sampling still starts from plain Gaussian noise.
    """
    b, c, h, w = noise.shape
    out, var, k, size = noise.clone(), 1.0, discount, h // 2
    while size >= 1:
        coarse = torch.randn(b, c, size, size, generator=g)
        out += k * torch.nn.functional.interpolate(coarse, size=(h, w), mode="nearest")
        var += k * k
        k *= discount
        size //= 2
    return out / math.sqrt(var)


def train_unet(specs, latents: torch.Tensor, taesd, args, work: Path):
    from dci.toyworld import model as tm

    torch.manual_seed(args.seed + 2)
    text_cfg, unet_cfg = dict(tm.TEXT_CONFIG), unet_config(args)
    base = tm.build_unet(unet_cfg, text_cfg["hidden_size"])
    clip = tm.build_clip(text_cfg)
    dm = base.diffusion_model
    te = clip.cond_stage_model.clip_l.transformer
    tm.init_weights(dm)
    tm.init_weights(te)
    tokens = CaptionTokens(clip)
    heads = AttributeHeads(text_cfg["hidden_size"])
    for p in list(dm.parameters()) + list(te.parameters()):
        p.requires_grad_(True)
    dm.train()
    te.train()
    pretrain_text(specs, te, heads, tokens, args, work)
    named = [("unet." + k, p) for k, p in dm.named_parameters()] + [
        ("text." + k, p) for k, p in te.named_parameters()
    ]
    if args.text_aux > 0:
        named += [("heads." + k, p) for k, p in heads.named_parameters()]
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.999))
    ema = {k: p.detach().clone() for k, p in named}
    sigmas = base.model_sampling.sigmas.float()
    alphas_cumprod = 1.0 / (1.0 + sigmas**2)
    ckpt = work / "unet_ckpt.safetensors"
    start, elapsed_before = 0, 0.0
    if ckpt.exists():
        sd, meta = load_st(ckpt)
        if json.loads(meta.get("unet_config", "null") or "null") not in (None, unet_cfg):
            raise SystemExit(f"{ckpt} was trained with UNet {meta['unet_config']}, not {json.dumps(unet_cfg)}")
        with torch.no_grad():
            for k, p in named:
                p.copy_(sd["w." + k])
                ema[k].copy_(sd["ema." + k])
        start, elapsed_before = int(meta["step"]), float(meta["elapsed"])
        if meta.get("opt_format") == OPT_FORMAT:
            load_optimizer_tensors(opt, sd, "opt.")
        elif start < args.unet_steps:
            # Format 1 numbered moments by insertion order, which is not the parameter order.
            raise SystemExit(f"{ckpt}: optimizer state of an older format; resume only at a phase boundary")
        log(f"UNet: resumed at step {start}")

    n_unet, n_text = tm.count_parameters(dm), tm.count_parameters(te)
    total = args.unet_steps + args.layout_steps
    log(
        f"UNet params {n_unet:,}, text params {n_text:,}; {args.unet_steps} + {args.layout_steps} layout "
        f"steps, batch {args.batch}"
    )
    # Layout phase: ε-loss weighted by (1 + σ²) (the v-prediction loss, capped), which turns up the
    # high-noise timesteps where an image's layout is decided; under the plain ε-loss their error is
    # divided by σ² (~200 at the top of SD's schedule), too faint for the prompt to learn to place objects.
    # With --layout-prediction v the v-loss itself carries that weight, so the ε-weights stay at 1.
    if args.layout_prediction == "v":
        layout_weight = torch.ones_like(sigmas)
    else:
        layout_weight = torch.clamp(1.0 + sigmas**2, max=args.layout_weight_cap)
        layout_weight = layout_weight / layout_weight.mean()
    # With --layout-zsnr the layout phase runs on the zero-terminal-SNR schedule (ComfyUI's zsnr setting),
    # where the top timestep is pure noise.
    layout_sigmas = sigmas
    if args.layout_zsnr:
        from comfy.model_sampling import rescale_zero_terminal_snr_sigmas

        layout_sigmas = rescale_zero_terminal_snr_sigmas(sigmas.clone()).float()
    layout_alphas = 1.0 / (1.0 + layout_sigmas**2)
    t0, run, run_aux, last_ckpt = time.time(), None, None, time.time()
    warmup = 200
    for step in range(start, total):
        rng = np.random.default_rng([args.seed, step])  # per-step stream: resuming reproduces the run
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        idx, ids, labels = caption_batch(specs, rng, tokens, args.batch, args.caption_dropout)
        x0 = latents[torch.from_numpy(idx)]
        noise = torch.randn(x0.shape, generator=g)
        noise = noise + args.offset_noise * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
        layout = step >= args.unet_steps
        if layout and args.layout_pyramid > 0:  # before x_t and the target are made
            noise = pyramid_noise(noise, args.layout_pyramid, g)
        t = torch.randint(0, len(sigmas), (args.batch,), generator=g)
        ab = (layout_alphas if layout else alphas_cumprod)[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        target = noise
        if layout and args.layout_prediction == "v":
            target = ab.sqrt() * noise - (1 - ab).sqrt() * x0

        if step == args.unet_steps:
            opt.state.clear()  # the layout phase starts with fresh moments, resumed or not
        if not layout:
            lr = args.lr * min(1.0, (step + 1) / warmup)
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / args.unet_steps))
            weight = torch.ones(args.batch)
        else:  # layout phase: warm restart of the schedule, weighted loss
            k = step - args.unet_steps
            lr = args.layout_lr * min(1.0, (k + 1) / 50)
            lr *= 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * k / args.layout_steps))
            weight = layout_weight[t]
        for grp in opt.param_groups:
            grp["lr"] = lr
        ctx = tm.text_hidden_states(te, te.get_input_embeddings()(ids))
        pred = dm(xt, t.float(), context=ctx)
        loss = (weight.view(-1, 1, 1, 1) * (pred - target) ** 2).mean()
        aux = heads.loss(ctx, ids, labels) if args.text_aux > 0 else torch.zeros(())
        opt.zero_grad(set_to_none=True)
        (loss + args.text_aux * aux).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (step + 1) / (step + 10))
        with torch.no_grad():
            for k, p in named:
                ema[k].lerp_(p.detach(), 1 - decay)
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        run_aux = aux.item() if run_aux is None else 0.98 * run_aux + 0.02 * aux.item()

        done = step + 1
        if done % 25 == 0 or done == total:
            el = time.time() - t0
            per = el / (done - start)
            log(
                f"UNet step {done}/{total} loss {run:.4f} text {run_aux:.4f} lr {lr:.2e} {per:.3f}s/step "
                f"eta {fmt_eta(per * (total - done))}"
            )
        if time.time() - last_ckpt > args.ckpt_minutes * 60 or done == total:
            tensors = {"w." + k: p for k, p in named}
            tensors.update({"ema." + k: v for k, v in ema.items()})
            tensors.update(optimizer_tensors(opt, "opt."))
            meta = {"step": str(done), "elapsed": str(elapsed_before + time.time() - t0), "opt_format": OPT_FORMAT,
                    "unet_config": json.dumps(unet_cfg)}
            save_atomic(tensors, ckpt, meta)
            write_model(
                dm,
                clip,
                taesd,
                ema,
                named,
                args,
                work / "toyworld_latest.safetensors",
                done,
                elapsed_before + time.time() - t0,
            )
            last_ckpt = time.time()
            log(f"checkpoint at step {done}")
    return dm, clip, ema, named, elapsed_before + time.time() - t0


def write_model(dm, clip, taesd, ema, named, args, path: Path, steps: int, seconds: float) -> None:
    """The shipped file: EMA weights of UNet and text encoder plus the VAE, fp16, with metadata."""
    from dci.toyworld import model as tm
    from dci.toyworld.render import WORLD_VERSION

    backup = {k: p.detach().clone() for k, p in named}
    with torch.no_grad():
        for k, p in named:
            p.copy_(ema[k])
    try:
        sd = tm.state_dict_for_file(dm, clip.cond_stage_model, taesd)
    finally:
        with torch.no_grad():
            for k, p in named:
                p.copy_(backup[k])
    meta = tm.file_metadata(
        tm.TEXT_CONFIG,
        unet_config(args),
        {
            "world_version": WORLD_VERSION,
            "steps": steps,
            "seed": args.seed,
            "train_seconds": round(seconds, 1),
            "batch": args.batch,
            "images": args.images,
            "vae_steps": args.vae_steps,
            "decoder_steps": args.decoder_steps,
            "vae_from": args.vae_from.name if args.vae_from else "",
            "lr": args.lr,
            "offset_noise": args.offset_noise,
            "caption_dropout": args.caption_dropout,
            "text_steps": args.text_steps,
            "text_aux": args.text_aux,
            "layout_steps": args.layout_steps,
            "layout_lr": args.layout_lr,
            "layout_weight_cap": args.layout_weight_cap,
            "layout_pyramid": args.layout_pyramid,
            "prediction": args.layout_prediction if steps > args.unet_steps else "eps",
            "zsnr": "true" if steps > args.unet_steps and args.layout_zsnr else "false",
        },
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    save_atomic(sd, path, meta)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfyui", default=os.environ.get("DCI_COMFYUI_DIR") or os.environ.get("COMFYUI_PATH"),
                    help="the ComfyUI tree (set when run through scripts/host.py)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
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
    ap.add_argument("--unet-steps", type=int, default=7500)
    ap.add_argument("--unet-config", default="",
                    help='JSON overrides of the UNet architecture, e.g. \'{"channel_mult": [1, 2, 2], '
                         '"num_res_blocks": [1, 1, 1], "transformer_depth": [1, 1, 1], '
                         '"transformer_depth_output": [1, 1, 1, 1, 1, 1]}\' (a 2×2 level)')
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=4e-4)
    ap.add_argument("--layout-steps", type=int, default=0,
                    help="extra steps with the (1 + σ²)-weighted loss after --unet-steps (0: skip)")
    ap.add_argument("--layout-lr", type=float, default=4e-4)
    ap.add_argument("--layout-weight-cap", type=float, default=1000.0, help="cap on 1 + σ² in the layout phase")
    ap.add_argument("--layout-pyramid", type=float, default=0.0,
                    help="discount of the coarse-noise pyramid added in the layout phase (0: none)")
    ap.add_argument("--layout-prediction", choices=("eps", "v"), default="eps",
                    help="what the model predicts after the layout phase (v: v-prediction)")
    ap.add_argument("--layout-zsnr", action="store_true",
                    help="layout phase on SD's schedule rescaled to zero terminal SNR (needs v)")
    ap.add_argument("--ema", type=float, default=0.998)
    ap.add_argument("--offset-noise", type=float, default=0.1)
    ap.add_argument("--caption-dropout", type=float, default=0.1)
    ap.add_argument("--ckpt-minutes", type=float, default=5.0)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    if args.layout_zsnr and args.layout_prediction != "v":
        ap.error("--layout-zsnr needs --layout-prediction v (ε-prediction is undefined at zero SNR)")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    setup_comfy(args.comfyui)
    args.work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    log(f"args {json.dumps({k: str(v) for k, v in vars(args).items()})}")
    specs, images = render_data(args.images, args.seed)
    log(f"rendered {len(specs)} scenes")
    taesd, latents = train_vae(specs, images, args, args.work)
    refine_decoder(specs, images, latents, taesd, args, args.work)
    dm, clip, ema, named, seconds = train_unet(specs, latents, taesd, args, args.work)
    write_model(
        dm, clip, taesd, ema, named, args, args.out, args.unet_steps + args.layout_steps, time.time() - t_start
    )
    log(
        f"wrote {args.out} ({args.out.stat().st_size / 1e6:.1f} MB) after {(time.time() - t_start) / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
