"""Trains the toy world's concept encoder (``dci.method.concept_encoder``) against the frozen toy model.

Taming Encoder's recipe (arXiv 2304.02642), scaled to one CPU core (docs/encoder.md explains each choice):
**cross-reference pairs** (the encoder reads 1-``--refs`` renders of a fresh toy-world instance in one narrow
context; the frozen UNet denoises a render of the same instance in another scene, captioned with the trigger's
rows in place of its colour, shape and decoration words), an **identity-weighted** loss (object cells, and more
so pattern and emblem cells, weigh more: the cheap stand-in for an identity loss on the decoded prediction) and
a varying number of references. Object-embedding dropping does not apply: the diffusion model is frozen, so
text-only generation is unchanged by construction. Only the encoder learns.

Training instances are disjoint from the evaluation concepts (``dev.toyworld.concepts``): no instance has a
concept's look or even its named parts (checked for every sample). Progress is printed; checkpoints (weights,
EMA, AdamW moments, the target pool) are written atomically every few minutes and a run resumes from the work
folder; every step draws from its own seeded stream. ``--max-minutes`` stops a run with a checkpoint.

Usage: python3 dev/host.py python -m dev.toyworld.train_encoder --work DIR [--out FILE] [--steps N] ...
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

DEFAULT_OUT = REPO / "assets" / "toyworld" / "concept_encoder.safetensors"
DEFAULT_MODEL = REPO / "assets" / "toyworld" / "toyworld_base.safetensors"
DEFAULT_WORK = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "comfyui-dci" / "encoder-work"
PLACEHOLDER = "sks"  # a single token of the SD1 vocabulary, replaced by the encoder's rows
OPT_FORMAT = "1"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the encoder file (fp16); replaced only with "
                                                                  "--overwrite")
    ap.add_argument("--overwrite", action="store_true")
    ap.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="the frozen toy-world model")
    ap.add_argument("--work", type=Path, default=DEFAULT_WORK, help="checkpoints; a later run resumes from them")
    for name, kind, default in (("seed", int, 0), ("steps", int, 1100), ("batch", int, 16), ("num-tokens", int, 2),
                                ("lr", float, 4e-4), ("ema", float, 0.998), ("val-every", int, 200),
                                ("ckpt-minutes", float, 3.0), ("threads", int, 1)):
        ap.add_argument(f"--{name}", type=kind, default=default)
    ap.add_argument("--refs", type=int, default=3, help="most reference renders per instance (1..refs per step)")
    ap.add_argument("--pool", type=int, default=300, help="targets encoded before the first step")
    ap.add_argument("--pool-growth", type=int, default=3, help="new targets encoded per step")
    ap.add_argument("--targets-per-instance", type=int, default=3, help="target scenes per instance")
    ap.add_argument("--omit-words", action="store_true",
                    help="leave caption parts out at random (default: the target's caption names its whole scene, "
                         "so the rows have no reason to carry scene attributes)")
    ap.add_argument("--object-weight", type=float, default=2.0, help="extra loss weight on the object's cells")
    ap.add_argument("--decoration-weight", type=float, default=4.0,
                    help="extra loss weight on the pattern's and emblem's cells")
    ap.add_argument("--offset-noise", type=float, default=0.1, help="as the toy model was trained")
    ap.add_argument("--max-minutes", type=float, default=0.0, help="stop with a checkpoint after this long (0: off)")
    ap.add_argument("--evaluate", type=Path, default=None,
                    help="only print the validation losses of this encoder file (no training)")
    return ap.parse_args(argv)


# -------------------------------------------------------------------------------------------- the data
def named_parts(obj) -> tuple:
    return (obj.shape, obj.colour, obj.pattern, obj.pattern_colour, obj.emblem, obj.emblem_colour)


def concept_named_parts() -> frozenset:
    from .concepts import CONCEPTS

    return frozenset(named_parts(c.obj) for c in CONCEPTS.values())


def random_instance(rng: np.random.Generator):
    """A decorated base-world object (pattern and emblem each 80 %) that is no evaluation concept."""
    from dci.toyworld import render as r

    banned = concept_named_parts()
    while True:
        colour = r.COLOURS[int(rng.integers(len(r.COLOURS)))]
        obj = r.sample_object(rng, colour, set())
        taken = {colour}
        if rng.random() < 0.8:
            pc = r._pick(rng, r.COLOURS, taken)
            obj = replace(obj, pattern=r._pick(rng, r.PATTERNS[1:]), pattern_colour=pc)
            taken.add(pc)
        else:
            obj = replace(obj, pattern="plain", pattern_colour=None)
        if rng.random() < 0.8:
            obj = replace(obj, emblem=r._pick(rng, r.EMBLEM_SHAPES), emblem_colour=r._pick(rng, r.COLOURS, taken))
        else:
            obj = replace(obj, emblem=None, emblem_colour=None)
        if named_parts(obj) not in banned:
            return obj


def check_disjoint(obj) -> None:
    from .concepts import concept_looks
    if obj.look() in concept_looks() or named_parts(obj) in concept_named_parts():
        raise AssertionError(f"training instance {obj} overlaps an evaluation concept")


def object_colours(obj) -> set:
    return {c for c in (obj.colour, obj.pattern_colour, obj.emblem_colour) if c}


def reference_scenes(obj, n: int, rng: np.random.Generator, avoid: str | None = None):
    """``n`` renders in one narrow context: one background, mostly large and centred, ±4 px jitter."""
    from dci.toyworld import render as r

    bg = r._pick(rng, r.COLOURS, object_colours(obj) | ({avoid} if avoid else set()))
    texture = "flat" if rng.random() < 0.8 else r._pick(rng, r.TEXTURES[1:])
    size = "large" if rng.random() < 0.75 else "small"
    position = "centre" if rng.random() < 0.75 else r._pick(rng, r.POSITIONS)
    out = []
    for _ in range(n):
        jitter = (float(rng.integers(-4, 5)), float(rng.integers(-4, 5)))
        out.append(r.SceneSpec(replace(obj, size=size, position=position, jitter=jitter), bg, texture))
    return out, bg


def target_scene(obj, avoid: str, rng: np.random.Generator):
    """The same instance in another scene: another background, a random position, size and texture."""
    from dci.toyworld import render as r

    bg = r._pick(rng, r.COLOURS, object_colours(obj) | {avoid})
    texture = r.TEXTURES[int(rng.choice(len(r.TEXTURES), p=[0.6, 0.2, 0.2]))]
    jitter = (float(rng.integers(-4, 5)), float(rng.integers(-4, 5)))
    return r.SceneSpec(replace(obj, size=r._pick(rng, r.SIZES), position=r._pick(rng, r.POSITIONS),
                               jitter=jitter), bg, texture)


def pool_item(seed: int, i: int, per_instance: int = 1):
    """Target ``i`` of the pool (a pure function of seed and i): instance ``i // per_instance`` in a scene of
    its own, so one instance has ``per_instance`` target scenes and none can be told from the references."""
    from dci.toyworld.render import COLOURS

    obj = random_instance(np.random.default_rng([seed, 7, i // per_instance]))
    check_disjoint(obj)
    rng = np.random.default_rng([seed, 8, i])
    return target_scene(obj, COLOURS[int(rng.integers(len(COLOURS)))], rng)


class TargetPool:
    """Targets and their latents. Encoding a render costs ~80 ms (more than a training step's UNet pass), so
    every target is encoded once: the pool starts with ``initial`` items and grows by ``growth`` per step, and
    each step draws its instances from what is there; references are rendered afresh every time (new context,
    jitter and count), so an instance is never seen twice the same way."""

    def __init__(self, seed: int, initial: int, growth: int, encode, per_instance: int = 1):
        self.seed, self.initial, self.growth, self.encode = seed, initial, growth, encode
        self.per_instance = per_instance
        self.scenes: list = []
        self.latents = torch.zeros(0, 4, 16, 16)

    def size_at(self, step: int) -> int:
        return self.initial + self.growth * step

    def fill(self, n: int, chunk: int = 32) -> None:
        from dci.toyworld.render import render_scene

        while len(self.scenes) < n:
            have = len(self.scenes)  # a chunk at a time, ahead of need (items are pure functions of their index)
            new = [pool_item(self.seed, i, self.per_instance) for i in range(have, max(n, have + chunk))]
            if len(self.latents) < len(self.scenes) + len(new):
                imgs = torch.from_numpy(np.stack([render_scene(sc) for sc in new])).float().div(255.0)
                self.latents = torch.cat([self.latents, self.encode(imgs)])
            self.scenes += new


def make_batch(rng: np.random.Generator, args, num_refs: int, pool: TargetPool, step: int, words: bool = False):
    """References ``[B, n, 3, S, S]``, target latents ``[B, 4, 16, 16]``, captions, loss weights. ``words``: the
    captions name the instance's colour, shape and decorations instead of holding the trigger's rows (same
    draws otherwise)."""
    from dci.toyworld.render import caption, decoration_phrase, render_scene

    from .train_io import cell_weights

    n = pool.size_at(step)
    pool.fill(n)
    refs, texts, weights = [], [], []
    idx = rng.integers(0, n, args.batch)
    noun_rows = " ".join([PLACEHOLDER] * args.num_tokens)
    for i in idx:
        tgt = pool.scenes[int(i)]
        obj = tgt.obj
        check_disjoint(obj)
        scenes, _ = reference_scenes(obj, num_refs, rng, avoid=tgt.background)
        refs.append(np.stack([render_scene(s) for s in scenes]))
        noun = f"{obj.colour} {obj.shape} {decoration_phrase(obj)}".strip() if words else f"{noun_rows} {obj.shape}"
        texts.append(caption(tgt, rng if args.omit_words else None, noun=noun))
        weights.append(cell_weights(tgt, args.object_weight, args.decoration_weight))
    ref = torch.from_numpy(np.stack(refs)).float().div(255.0).permute(0, 1, 4, 2, 3).contiguous()
    return ref, pool.latents[torch.from_numpy(idx)], texts, torch.stack(weights).unsqueeze(1)


# ------------------------------------------------------------------------------------------- the model
class Frozen:
    """The toy model's UNet, text encoder and VAE, frozen; assembles captions with the encoder's rows."""

    def __init__(self, path: Path, num_tokens: int):
        from dci.toyworld.model import load_toyworld

        from .train_text import CaptionTokens

        self.patcher, self.clip, self.vae = load_toyworld(path)
        self.dm = self.patcher.model.diffusion_model
        self.text = self.clip.cond_stage_model.clip_l
        for p in list(self.dm.parameters()) + list(self.text.parameters()):
            p.requires_grad_(False)
        self.dm.eval()
        self.text.eval()
        self.tokens = CaptionTokens(self.clip)
        self.embedding = self.text.transformer.get_input_embeddings()
        ids = self.tokens(PLACEHOLDER)
        self.placeholder = ids[1]
        if ids[2] != 49407:
            raise SystemExit(f"{PLACEHOLDER!r} is not a single token of this tokenizer")
        self.num_tokens = num_tokens
        self.alphas_cumprod = 1.0 / (1.0 + self.patcher.model.model_sampling.sigmas.float() ** 2)

    def anchor(self) -> torch.Tensor:
        """The mean input row of the words that name the toy world's parts (where the encoder starts)."""
        from dci.toyworld import render as r

        words = [*r.COLOURS, *r.SHAPES, "stripes", "dots", "band", "emblem"]
        rows = [self.embedding.weight[self.tokens(w)[1]].float() for w in words]
        return torch.stack(rows).mean(0).detach()

    def latents(self, images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.patcher.model.process_latent_in(self.vae.encode(images)).float()

    def context(self, texts: list[str], rows: torch.Tensor | None) -> torch.Tensor:
        from dci.comfyui.training.text_encoder import text_forward

        ids = torch.tensor([self.tokens(t) for t in texts])
        if rows is None:  # plain captions
            with torch.no_grad():
                return text_forward(self.text, self.embedding(ids, out_dtype=torch.float32))
        mask = ids == self.placeholder
        if int(mask.sum()) != rows.shape[0] * self.num_tokens:
            raise AssertionError("a caption lost its trigger rows (too long?)")
        with torch.no_grad():
            embeds = self.embedding(ids, out_dtype=torch.float32)
        embeds = embeds.masked_scatter(mask.unsqueeze(-1), rows.reshape(-1, rows.shape[-1]).to(embeds.dtype))
        return text_forward(self.text, embeds)

    def loss(self, x0, ctx, weights, g: torch.Generator, offset: float, t: torch.Tensor | None = None):
        noise = torch.randn(x0.shape, generator=g)
        noise = noise + offset * torch.randn(x0.shape[0], x0.shape[1], 1, 1, generator=g)
        if t is None:
            t = torch.randint(0, len(self.alphas_cumprod), (x0.shape[0],), generator=g)
        ab = self.alphas_cumprod[t].view(-1, 1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
        err = (self.dm(xt, t.float(), context=ctx) - noise) ** 2
        return (err * weights).mean() / weights.mean()


def validation(frozen: Frozen, encoder, args, pool: TargetPool, batches: int = 3,
               words: bool = False) -> tuple[float, float]:
    """Loss on fixed held-out instances and timesteps: (encoder, the anchor rows alone = "just the class");
    ``words``: a third value, the captions naming everything nameable instead (what words alone give)."""
    out = []
    pool.fill(pool.size_at(0))
    variants = [lambda ref: encoder(ref), lambda ref: encoder.anchor.expand(ref.shape[0], args.num_tokens, -1)]
    variants += [None] if words else []
    with torch.no_grad():
        for rows_fn in variants:
            total = 0.0
            for b in range(batches):
                rng = np.random.default_rng([args.seed, 99991, b])
                ref, x0, texts, w = make_batch(rng, args, 2, pool, 0, words=rows_fn is None)
                g = torch.Generator().manual_seed(1000 + b)
                t = torch.linspace(50, 950, x0.shape[0]).long()
                rows = None if rows_fn is None else rows_fn(ref)
                total += frozen.loss(x0, frozen.context(texts, rows), w, g, args.offset_noise, t).item()
            out.append(total / batches)
    return tuple(out)


def evaluate_file(path: Path, frozen: Frozen, args) -> None:
    """``--evaluate FILE``: the validation losses of an encoder file, beside the anchor rows and the words."""
    from dci.files.concept_encoder import load_encoder
    from dci.method.concept_encoder import ConceptEncoder, EncoderConfig

    from .train_io import log

    f = load_encoder(path)
    encoder = ConceptEncoder(EncoderConfig.from_dict(f.config))
    encoder.load_state_dict(f.tensors)
    encoder.eval()
    pool = TargetPool(args.seed + 1_000_003, args.batch * 3, 0, frozen.latents, args.targets_per_instance)
    enc, anchor, words = validation(frozen, encoder, args, pool, words=True)
    log(f"validation loss of {path.name}: encoder rows {enc:.4f}, anchor rows {anchor:.4f}, the full nameable "
        f"description in words {words:.4f}")


# ---------------------------------------------------------------------------------------------- training
def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.out.exists() and not args.overwrite and args.evaluate is None:
        raise SystemExit(f"{args.out} exists; pass --overwrite to replace it, or another --out")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from dev import harness

    harness.configure()
    from dci.comfyui.concept import base_fingerprint
    from dci.files.concept_encoder import save_encoder
    from dci.method.concept_encoder import ConceptEncoder, EncoderConfig
    from dci.toyworld.render import WORLD_VERSION

    from .train_io import Ema, fmt_eta, load_st, log, save_atomic

    args.work.mkdir(parents=True, exist_ok=True)
    log(f"args {json.dumps({k: str(v) for k, v in vars(args).items()})}")
    torch.manual_seed(args.seed)
    frozen = Frozen(args.model, args.num_tokens)
    if args.evaluate is not None:
        evaluate_file(args.evaluate, frozen, args)
        return
    config = EncoderConfig(width=frozen.embedding.weight.shape[1], num_tokens=args.num_tokens)
    encoder = ConceptEncoder(config)
    with torch.no_grad():
        encoder.anchor.copy_(frozen.anchor())
        encoder.out.weight.mul_(0.1)
        encoder.out.bias.zero_()
    named = list(encoder.named_parameters())
    params = [p for _, p in named]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    ema = Ema(named, args.ema)
    ckpt = args.work / "encoder_ckpt.safetensors"
    start, elapsed_before = 0, 0.0
    pool = TargetPool(args.seed, args.pool, args.pool_growth, frozen.latents, args.targets_per_instance)
    val_pool = TargetPool(args.seed + 1_000_003, args.batch * 3, 0, frozen.latents, args.targets_per_instance)
    if ckpt.exists():
        sd, meta = load_st(ckpt)
        if json.loads(meta["config"]) != config.to_dict() or meta.get("opt_format") != OPT_FORMAT:
            raise SystemExit(f"{ckpt} belongs to another encoder configuration; use another --work")
        ema.load_checkpoint(sd, opt)
        with torch.no_grad():
            encoder.anchor.copy_(sd["anchor"])
        pool.latents = sd["pool_latents"]
        start, elapsed_before = int(meta["step"]), float(meta["elapsed"])
        log(f"resumed at step {start} ({elapsed_before / 60:.1f} min so far)")
    n_params = sum(p.numel() for p in params)
    t_pool = time.time()
    pool.fill(pool.size_at(start))
    log(f"target pool: {len(pool.scenes)} targets ({time.time() - t_pool:.0f} s)")
    log(f"encoder {n_params:,} parameters, config {json.dumps(config.to_dict())}; {args.steps} steps, batch "
        f"{args.batch}, 1-{args.refs} references")

    def write(path: Path, steps: int, seconds: float, overwrite: bool) -> None:
        with ema.applied():
            recipe = {k: getattr(args, k) for k in ("seed", "batch", "refs", "lr", "ema", "object_weight",
                                                    "decoration_weight", "offset_noise", "pool", "pool_growth",
                                                    "targets_per_instance", "omit_words")}
            recipe["steps"] = steps
            extra = {"base_name": args.model.name, "world_version": WORLD_VERSION, "recipe": json.dumps(recipe),
                     "train_seconds": f"{seconds:.1f}"}
            save_encoder(path, encoder.state_dict(), config.to_dict(), "sd1", "clip_l",
                         base_fingerprint(frozen.patcher), extra, overwrite=overwrite)

    def checkpoint(done: int) -> None:
        seconds = elapsed_before + time.time() - t0
        tensors = ema.checkpoint_tensors(opt)
        tensors["anchor"] = encoder.anchor
        tensors["pool_latents"] = pool.latents
        save_atomic(tensors, ckpt, {"step": str(done), "elapsed": str(seconds), "opt_format": OPT_FORMAT,
                                    "config": json.dumps(config.to_dict())})
        write(args.work / "encoder_latest.safetensors", done, seconds, overwrite=True)
        log(f"checkpoint at step {done} ({seconds / 60:.1f} min of training)")

    t0, last_ckpt, run = time.time(), time.time(), None
    warmup = 100
    encoder.train()
    done = start
    for step in range(start, args.steps):
        rng = np.random.default_rng([args.seed, step])
        g = torch.Generator().manual_seed(int(rng.integers(2**62)))
        ref, x0, texts, w = make_batch(rng, args, int(rng.integers(1, args.refs + 1)), pool, step)
        lr = args.lr * min(1.0, (step + 1) / warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / args.steps)))
        for grp in opt.param_groups:
            grp["lr"] = lr
        loss = frozen.loss(x0, frozen.context(texts, encoder(ref)), w, g, args.offset_noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema.update(step)
        run = loss.item() if run is None else 0.98 * run + 0.02 * loss.item()
        done = step + 1
        if done % 25 == 0 or done == args.steps:
            per = (time.time() - t0) / (done - start)
            log(f"step {done}/{args.steps} loss {run:.4f} lr {lr:.2e} {per:.3f}s/step "
                f"eta {fmt_eta(per * (args.steps - done))}")
        if args.val_every and (done % args.val_every == 0 or done == args.steps):
            encoder.eval()
            enc, anchor = validation(frozen, encoder, args, val_pool)
            encoder.train()
            log(f"validation at step {done}: encoder {enc:.4f}, anchor rows (no identity) {anchor:.4f}")
        over = args.max_minutes and elapsed_before + time.time() - t0 > args.max_minutes * 60
        if time.time() - last_ckpt > args.ckpt_minutes * 60 or done == args.steps or over:
            checkpoint(done)
            last_ckpt = time.time()
        if over and done < args.steps:
            log(f"--max-minutes reached at step {done} of {args.steps}; the same command resumes")
            break
    seconds = elapsed_before + time.time() - t0
    write(args.out, done, seconds, overwrite=args.overwrite)
    log(f"wrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB) after {done} steps, {seconds / 60:.1f} min")


if __name__ == "__main__":
    main()
