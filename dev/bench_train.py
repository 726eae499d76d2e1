"""``make bench-train``: our trainer (DCI Train Concept, mode ico, fp32) vs ComfyUI's own Train LoRA, side by side.

Both train the SD1.5-detected tiny checkpoint (generated once into a temporary folder) on the same random
images, and then, for the SDXL-architecture rows, the SDXL-detected tiny checkpoint (``dev.fixtures_sdxl``: a
small 320-channel UNet with SDXL's detected layout and ComfyUI's full CLIP-L + OpenCLIP-bigG text encoders), with the same batch size, resolution, step count and precision (fp32, no gradient checkpointing
unless ``--checkpointing``). Train LoRA puts a LoRA on every layer (and full diffs on biases and norms, as it
does); its rank is chosen so that its trainable-value count is the closest to ours, and both counts are
printed. Train LoRA gets its latents through the stock ``RebatchLatents`` (it fails on a single latent
batch), encoded by the stock ``VAEEncode``, and one caption encoded by ``CLIPTextEncode``.

Every run is a process of its own that boots the in-process ComfyUI host, so that its peak RSS
(``resource.getrusage``) is its own; "train +MB" is that peak minus the RSS just before the training node
started (what training adds on top of the loaded models).

Seconds per step: both nodes report every optimiser step through ``comfy.utils.ProgressBar``; a global
progress hook stamps each report. The first report closes the set-up (latent/caption preparation, model
loading, optimiser creation) and the first step (lazy allocations), so it is dropped; the time per step is
the median of the intervals between the later reports (robust to the odd slow interval on a busy machine).
This needs at least 3 steps.

Prints a table, the concept file size, then, last, one line per resolution (SDXL rows end in ``arch=sdxl``):
ico_step_ratio_vs_trainlora=<ours/theirs seconds per step> ico_peak_mem_ratio_vs_trainlora=<ours/theirs peak RSS> res=<px>
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import harness
from .bench import measure, report, start_worker
from .host import REPO


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def lora_shape(model) -> tuple[int, int]:
    """(A, B) with Train LoRA's trainable-value count = rank * A + B for this MODEL.

    Mirrors which weights Train LoRA adapts: every layer ComfyUI can wrap; weights of 2+ dimensions get a
    rank-r pair (out x r and r x in), 1-D weights and all biases get a full diff.
    """
    per_rank = fixed = 0
    for _, m in model.model.named_modules():
        if not hasattr(m, "weight_function"):
            continue
        w = getattr(m, "weight", None)
        if w is not None:
            if w.dim() >= 2:
                per_rank += w.shape[0] + w.shape[1:].numel()
            else:
                fixed += w.numel()
        if getattr(m, "bias", None) is not None:
            fixed += m.bias.numel()
    return per_rank, fixed


def worker(args) -> None:
    start_worker(args.threads)
    import comfy.utils
    import folder_paths
    import torch

    from dci.files.concept import load_concept

    run = harness.run_node
    if args.checkpoint == "toy":  # the toy world's bundled model (its own small text encoder), as the demo trains it
        model, clip, vae = run("DCIToyWorldLoader", model_name="toyworld_base.safetensors")[0]
        noun, trigger = "circle", "sks"
    else:
        model, clip, vae = run("CheckpointLoaderSimple", ckpt_name=harness.add_model_file(Path(args.checkpoint)))[0]
        noun, trigger = "dog", "qxz"
    g = torch.Generator().manual_seed(0)
    images = torch.rand(args.images, args.res, args.res, 3, generator=g)

    if args.ablate == "text-fp32":  # the lever off: ComfyUI casts the text encoders' weights in every layer call
        import contextlib as _cl

        from dci.comfyui.training import loop

        loop.weights_in = lambda module, dtype: _cl.nullcontext(0)
    prof = None
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        prof = profile(activities=[ProfilerActivity.CPU])
    stamps: list[float] = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: stamps.append(
        time.perf_counter()))
    result: dict = {}
    if args.trainer == "ico":
        inputs = dict(model=model, clip=clip, vae=vae, images=images, class_noun=noun, trigger_word=trigger,
                      num_tokens=2, mode="ico", prefix_context="photo of a", suffix_context=".", steps=args.steps,
                      batch_size=args.batch, learning_rate=1e-5, context_lr_multiplier=10.0, resolution=args.res,
                      seed=0, precision="fp32", gradient_checkpointing=args.checkpointing, save_name="bench",
                      overwrite=True, resume=False, checkpoint_every=0, random_flip=True)
        rss_before = _rss_mb()
        t0 = time.perf_counter()
        with prof or contextlib.nullcontext():
            run("DCITrainConcept", **inputs)
        total = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        path = Path(folder_paths.get_folder_paths("concepts")[0]) / "bench.safetensors"
        concept = load_concept(path)
        trained = [*concept.kv_deltas.values(), *concept.tokens.values(), *concept.contexts.values()]
        per_rank, fixed = lora_shape(model)
        result.update(trainable=sum(t.numel() for t in trained), file_bytes=path.stat().st_size,
                      lora_per_rank=per_rank, lora_fixed=fixed)
    else:
        (pos,) = run("CLIPTextEncode", clip=clip, text=f"photo of a {trigger} {noun}")[0]
        (lat,) = run("VAEEncode", pixels=images, vae=vae)[0]
        (batches,), _ = harness.run_node_lists("RebatchLatents", latents=[lat], batch_size=[1])
        inputs = dict(model=[model], latents=batches, positive=[pos], batch_size=[args.batch],
                      grad_accumulation_steps=[1], steps=[args.steps], learning_rate=[1e-4], rank=[args.rank],
                      optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=["fp32"],
                      lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[args.checkpointing],
                      existing_lora=["[None]"])
        rss_before = _rss_mb()
        t0 = time.perf_counter()
        with prof or contextlib.nullcontext():
            out, _ = harness.run_node_lists("TrainLoraNode", **inputs)
        total = time.perf_counter() - t0
        peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        lora_sd = out[1][0]
        result.update(trainable=sum(t.numel() for t in lora_sd.values()),
                      file_bytes=sum(t.numel() * t.element_size() for t in lora_sd.values()))
    if len(stamps) < 3:
        raise SystemExit(f"{args.trainer}: {len(stamps)} progress reports; at least 3 steps are needed")
    intervals = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    result.update(sec_per_step=statistics.median(intervals), setup_and_first=stamps[0] - t0, total=total,
                  peak_rss_mb=peak_kb / 1024, rss_before_mb=rss_before, steps=args.steps)
    if prof is not None:
        result["profile"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    report(result)


def run_worker(trainer: str, res: int, steps: int, rank: int, args, checkpoint: Path, ablate: str = "") -> dict:
    extra = (["--checkpointing"] if args.checkpointing else []) + (["--profile"] if args.profile else [])
    extra += ["--ablate", ablate] if ablate else []
    return measure(__spec__.name, ["--trainer", trainer, "--res", str(res), "--steps", str(steps), "--rank", str(rank),
                                   "--checkpoint", str(checkpoint), "--threads", str(args.threads),
                                   "--images", str(args.images), "--batch", str(args.batch), *extra])


def write_checkpoint(path: Path, arch: str) -> None:
    harness.configure()
    if arch == "sdxl":
        from .fixtures_sdxl import write_tiny_sdxl_checkpoint

        write_tiny_sdxl_checkpoint(path)
    else:
        from .fixtures import write_tiny_sd15_checkpoint

        write_tiny_sd15_checkpoint(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--write-checkpoint", default="", help=argparse.SUPPRESS)
    ap.add_argument("--arch", default="sd15", help=argparse.SUPPRESS)
    ap.add_argument("--trainer", default="ico", help=argparse.SUPPRESS)
    ap.add_argument("--res", type=int, default=64, help=argparse.SUPPRESS)
    ap.add_argument("--rank", type=int, default=8, help=argparse.SUPPRESS)
    ap.add_argument("--checkpoint", default="", help=argparse.SUPPRESS)
    ap.add_argument("--resolutions", default="512,64", help="comma-separated pixel sizes (multiples of 64)")
    ap.add_argument("--sdxl-resolutions", default="1024", help="pixel sizes of the SDXL-architecture rows "
                    "(empty: none)")
    ap.add_argument("--toy-resolutions", default="128", help="pixel sizes of the rows on the toy world's bundled "
                    "model (its own 3.3 M-parameter text encoder; empty: none)")
    ap.add_argument("--steps", type=int, default=20, help="training steps below 512 px")
    ap.add_argument("--steps-512", type=int, default=4, help="training steps at 512 px and above (slow on a CPU)")
    ap.add_argument("--images", type=int, default=4, help="training images (at least 2)")
    ap.add_argument("--batch", type=int, default=1, help="images per step, for both trainers")
    ap.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both trainers")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per worker")
    ap.add_argument("--ablate", choices=("", "text-fp32"), default="",
                    help="also run our trainer with this lever off (text-fp32: the text encoders' half-precision "
                         "weights cast in every layer call, as ComfyUI does, instead of held in fp32 for the run)")
    ap.add_argument("--profile", action="store_true",
                    help="also print torch.profiler's top operations of each run (the profiler slows the steps)")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    if args.write_checkpoint:
        write_checkpoint(Path(args.write_checkpoint), args.arch)
        return 0
    if args.images < 2:
        ap.error("--images must be at least 2 (Train LoRA needs a list of latents)")
    lines, rows, sizes, lever_lines = [], [], [], []
    t_start = time.perf_counter()
    runs = [("sd15", r) for r in args.resolutions.split(",") if r.strip()]
    runs += [("sdxl", r) for r in args.sdxl_resolutions.split(",") if r.strip()]
    runs += [("toy", r) for r in args.toy_resolutions.split(",") if r.strip()]
    with tempfile.TemporaryDirectory(prefix="dci-bench-train-") as tmp:
        checkpoints: dict[str, Path] = {}
        for arch, res in [(a, int(r)) for a, r in runs]:
            if arch == "toy":
                checkpoints[arch] = Path("toy")
            if arch not in checkpoints:
                checkpoints[arch] = Path(tmp) / f"tiny_{arch}.safetensors"
                subprocess.run([sys.executable, "-m", __spec__.name, "--write-checkpoint", str(checkpoints[arch]),
                                "--arch", arch], check=True, env=os.environ, stdout=subprocess.DEVNULL, cwd=REPO)
            steps = args.steps_512 if res >= 512 else args.steps
            if steps < 3:
                ap.error("at least 3 steps are needed to time a step without the set-up")
            ours = run_worker("ico", res, steps, 0, args, checkpoints[arch])
            rank = max(1, min(128, round((ours["trainable"] - ours["lora_fixed"]) / ours["lora_per_rank"])))
            theirs = run_worker("trainlora", res, steps, rank, args, checkpoints[arch])
            tag = "" if arch == "sd15" else f" {arch}"
            sizes.append((f"{res}px{tag}", ours["file_bytes"], theirs["file_bytes"]))
            rows.append((f"DCITrainConcept ico{tag}", "-", ours, res))
            rows.append((f"TrainLoraNode{tag}", rank, theirs, res))
            if args.ablate:
                off = run_worker("ico", res, steps, 0, args, checkpoints[arch], args.ablate)
                rows.append((f"ico{tag}, {args.ablate} off", "-", off, res))
                lever_lines.append(f"lever={args.ablate} step_ratio_on_vs_off={ours['sec_per_step'] / off['sec_per_step']:.3f} "
                                   f"peak_mem_ratio_on_vs_off={ours['peak_rss_mb'] / off['peak_rss_mb']:.3f} res={res}"
                                   + (f" arch={arch}" if tag else ""))
            step_ratio = ours["sec_per_step"] / theirs["sec_per_step"]
            mem_ratio = ours["peak_rss_mb"] / theirs["peak_rss_mb"]
            lines.append(f"ico_step_ratio_vs_trainlora={step_ratio:.3f} ico_peak_mem_ratio_vs_trainlora="
                         f"{mem_ratio:.3f} res={res}" + (f" arch={arch}" if tag else ""))
    print(f"images {args.images}, batch {args.batch}, fp32, gradient checkpointing "
          f"{'on' if args.checkpointing else 'off'}, {args.threads} thread(s) per worker, "
          f"wall {time.perf_counter() - t_start:.0f}s")
    print(f"{'trainer':25} {'rank':>4} {'res':>4} {'steps':>5} {'trainable':>10} {'s/step':>8} {'setup+1st':>9} "
          f"{'peak MB':>8} {'train +MB':>9}")
    for name, rank, r, res in rows:
        print(f"{name:25} {rank!s:>4} {res:>4} {r['steps']:>5} {r['trainable']:>10} {r['sec_per_step']:8.3f} "
              f"{r['setup_and_first']:9.1f} {r['peak_rss_mb']:8.0f} {r['peak_rss_mb'] - r['rss_before_mb']:9.0f}")
    for res, ours_bytes, lora_bytes in sizes:
        print(f"concept file ({res} run): {ours_bytes / 2**20:.2f} MiB; Train LoRA tensors in fp32: "
              f"{lora_bytes / 2**20:.2f} MiB")
    if args.profile:
        for name, _, r, res in rows:
            print(f"\n{name} at {res}px, whole run ({r['steps']} steps):\n{r['profile']}")
    for line in lever_lines + lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
