"""``make bench-dci``: DCI KSampler vs the stock KSampler, side by side in one run.

Same model (the SD1.5-detected tiny checkpoint with a random concept), seed, steps and resolution.
Time: one process samples with the stock KSampler and every DCI configuration in turn, after a warm-up call,
``--repeats`` rounds; the minimum per configuration counts (interleaving keeps the comparison fair when the
machine is busy). Memory: every configuration runs once more in a process of its own, whose peak RSS is its
own. The theoretical bound of the time ratio counts the two-branch steps that actually ran (k of n, recorded
by ``fixtures.BranchProbe``; ``split`` is a noise level, so k is not always round(a × n)): 1 + k/n (separate
guidance: the UNet batch grows from 2 to 4 rows per image on those steps) or 1 + k/2n (shared: 3 rows).

Prints a table, then one line per configuration:
dci_time_ratio=<DCI/KSampler wall time> bound=<bound> mem_ratio=<peak RSS ratio> split=<a> guidance=<mode> res=<px>
two_branch_steps=<k> steps=<n>
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from . import harness
from .bench import measure, report, start_worker

CONFIGS = [("ksampler", 0.0)] + [(g, a) for a in (0.2, 0.3) for g in ("shared", "separate")]


def worker(args) -> None:
    start_worker(args.threads)
    import folder_paths

    from dci.files.concept import save_concept

    from .fixtures import BranchProbe, random_concept, write_tiny_sd15_checkpoint

    ckpt = Path(args.checkpoint)
    if not ckpt.exists():
        write_tiny_sd15_checkpoint(ckpt)
    run = harness.run_node
    model, clip, _ = run("CheckpointLoaderSimple", ckpt_name=harness.add_model_file(ckpt))[0]
    save_concept(random_concept(model, clip), folder_paths.get_folder_paths("concepts")[0], "bench", overwrite=True)
    m, c, ref = run("DCILoadConcept", model=model, clip=clip, concept_name="bench.safetensors",
                    strength_model=1.0, strength_clip=1.0)[0]
    probe = BranchProbe()
    m = probe.attach(m)
    (pos,) = run("DCIPromptEncode", clip=c, text="a photo of sks dog swimming in a pool", auxiliary_noun="",
                 concept=ref)[0]
    (neg,) = run("CLIPTextEncode", clip=c, text="blurry")[0]
    (lat,) = run("EmptyLatentImage", width=args.res, height=args.res, batch_size=1)[0]
    common = dict(model=m, seed=3, steps=args.steps, cfg=5.0, sampler_name="euler", scheduler="normal",
                  positive=pos, negative=neg, latent_image=lat, denoise=1.0)

    def sample(mode: str, split: float) -> float:
        probe.calls.clear()
        t0 = time.perf_counter()
        if mode == "ksampler":
            run("KSampler", **common)
        else:
            run("DCIKSampler", **common, split=split, lam=0.0, aux_map="reference", guidance=mode, aux_seed=1)
        return time.perf_counter() - t0

    if args.mode == "time":
        sample("ksampler", 0.0)  # loads the model
        best = {f"{m_}:{a}": float("inf") for m_, a in CONFIGS}
        two_branch = {}
        for _ in range(args.repeats):
            for m_, a in CONFIGS:
                best[f"{m_}:{a}"] = min(best[f"{m_}:{a}"], sample(m_, a))
                two_branch[f"{m_}:{a}"] = len(probe.sigmas(True))
        report({"seconds": best, "two_branch_steps": two_branch})
    else:
        sample(args.mode, args.split)
        report({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_worker(mode: str, res: int, steps: int, split: float, checkpoint: Path, threads: int, repeats: int) -> dict:
    return measure(__spec__.name, ["--mode", mode, "--res", str(res), "--steps", str(steps), "--split", str(split),
                                   "--checkpoint", str(checkpoint), "--threads", str(threads),
                                   "--repeats", str(repeats)])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="time")
    ap.add_argument("--res", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20, help="sampling steps at 64 px")
    ap.add_argument("--steps-512", type=int, default=6, help="sampling steps at 512 px (slow on a CPU)")
    ap.add_argument("--split", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--threads", type=int, default=max(1, os.cpu_count() or 1))
    ap.add_argument("--resolutions", default="512,64", help="comma-separated pixel sizes")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    lines, rows = [], []
    with tempfile.TemporaryDirectory(prefix="dci-bench-") as tmp:
        checkpoint = Path(tmp) / "tiny_sd15.safetensors"
        for res in [int(r) for r in args.resolutions.split(",")]:
            steps = args.steps_512 if res >= 512 else args.steps
            timed = run_worker("time", res, steps, 0.0, checkpoint, args.threads, args.repeats)
            times, ran = timed["seconds"], timed["two_branch_steps"]
            mem = {f"{m}:{a}": run_worker(m, res, steps, a, checkpoint, args.threads, 1)["peak_rss_mb"]
                   for m, a in CONFIGS}
            base_t, base_m = times["ksampler:0.0"], mem["ksampler:0.0"]
            rows.append(("KSampler", "-", "-", res, steps, base_t, base_m, 1.0, 1.0, "-", "-"))
            for guidance, split in CONFIGS[1:]:
                key = f"{guidance}:{split}"
                k = ran[key]
                bound = 1 + k / steps if guidance == "separate" else 1 + k / (2 * steps)
                tr, mr = times[key] / base_t, mem[key] / base_m
                rows.append(("DCI", split, guidance, res, steps, times[key], mem[key], tr, mr, bound, k))
                lines.append(f"dci_time_ratio={tr:.3f} bound={bound:.2f} mem_ratio={mr:.3f} split={split} "
                             f"guidance={guidance} res={res} two_branch_steps={k} steps={steps}")
    print(f"threads={args.threads} repeats={args.repeats} (time: min over repeats, interleaved in one process)")
    print(f"{'sampler':8} {'split':>5} {'guidance':>9} {'res':>4} {'steps':>5} {'2-br':>4} {'seconds':>8} "
          f"{'peak MB':>8} {'time x':>7} {'mem x':>6} {'bound':>5}")
    for s, a, g, res, steps, sec, mb, tr, mr, bound, k in rows:
        b = f"{bound:.2f}" if bound != "-" else "-"
        print(f"{s:8} {a!s:>5} {g:>9} {res:>4} {steps:>5} {k!s:>4} {sec:8.2f} {mb:8.0f} {tr:7.3f} {mr:6.3f} {b:>5}")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
