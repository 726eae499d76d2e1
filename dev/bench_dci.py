"""``make bench-dci``: DCI KSampler vs the stock KSampler, side by side in one run.

Setups (``--setups``, each ``model:res:steps``): the SD1.5-detected tiny checkpoint at 512 px, the bundled toy
model at its own 128 px, and a tiny SDXL-detected model (random weights, built in memory) at 1024 px; each with
a random concept, the same seed, steps and resolution for every sampler. The tiny models make the ratios an
upper bound of DCI's overhead: attention, where DCI adds work, is a larger share of them than of a real UNet.
Time: one process samples with the stock KSampler and every DCI configuration in turn, after a warm-up call,
``--repeats`` rounds; the minimum per configuration counts, the spread (max/min - 1) is printed beside it
(interleaving keeps the comparison fair when the machine is busy). Memory: every configuration runs once more
in a process of its own, whose peak RSS is its own. The theoretical bound of the time ratio counts the
two-branch steps that actually ran (k of n, recorded by ``fixtures.BranchProbe``; ``split`` is a noise level, so
k is not always round(a × n)): 1 + k/n (separate guidance: the UNet batch grows from 2 to 4 rows per image on
those steps) or 1 + k/2n (shared: 3 rows). ``--profile`` prints torch.profiler's top operations instead.

Prints a table, then one line per configuration:
dci_time_ratio=<DCI/KSampler wall time> bound=<bound> mem_ratio=<peak RSS ratio> split=<a> guidance=<mode> res=<px>
two_branch_steps=<k> steps=<n> model=<setup> spread=<largest spread of the pair> load=<1-min load average>
sampling_mem_ratio=<ratio of the memory the sampling itself added: peak RSS during it minus RSS before it>
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
SETUPS = "sd15:512:20,toy:128:20,sdxl:1024:20"
PROMPT = "a photo of sks dog swimming in a pool"


def load(kind: str, checkpoint: Path):
    """(MODEL, CLIP, concept family) of a setup."""
    run = harness.run_node
    if kind == "sd15":
        from .fixtures import write_tiny_sd15_checkpoint

        if not checkpoint.exists():
            write_tiny_sd15_checkpoint(checkpoint)
        model, clip, _ = run("CheckpointLoaderSimple", ckpt_name=harness.add_model_file(checkpoint))[0]
        return model, clip, "sd1"
    if kind == "toy":
        model, clip, _ = run("DCIToyWorldLoader", model_name="toyworld_base.safetensors")[0]
        return model, clip, "sd1"
    if kind == "sdxl":
        from .fixtures import tiny_sdxl_in_memory

        model, clip, _ = tiny_sdxl_in_memory()
        return model, clip, "sdxl"
    raise SystemExit(f"unknown model {kind!r}: one of sd15, toy, sdxl")


def worker(args) -> None:
    start_worker(args.threads)
    import folder_paths
    import torch

    from dci.files.concept import save_concept

    from .fixtures import BranchProbe, random_concept

    run = harness.run_node
    model, clip, family = load(args.model, Path(args.checkpoint))
    save_concept(random_concept(model, clip, family=family), folder_paths.get_folder_paths("concepts")[0], "bench",
                 overwrite=True)
    m, c, ref = run("DCILoadConcept", model=model, clip=clip, concept_name="bench.safetensors",
                    strength_model=1.0, strength_clip=1.0)[0]
    probe = BranchProbe()
    m = probe.attach(m)
    (pos,) = run("DCIPromptEncode", clip=c, text=PROMPT, auxiliary_noun="", concept=ref)[0]
    (neg,) = run("CLIPTextEncode", clip=c, text="blurry")[0]
    (lat,) = run("EmptyLatentImage", width=args.res, height=args.res, batch_size=1)[0]
    common = dict(model=m, seed=3, steps=args.steps, cfg=5.0, sampler_name="euler", scheduler="normal",
                  positive=pos, negative=neg, latent_image=lat, denoise=1.0)

    def sample(mode: str, split: float, steps: int | None = None) -> float:
        probe.calls.clear()
        t0 = time.perf_counter()
        kw = {**common, "steps": steps or args.steps}
        if mode == "ksampler":
            run("KSampler", **kw)
        else:
            run("DCIKSampler", **kw, split=split, lam=0.0, aux_map="reference", guidance=mode, aux_seed=1)
        return time.perf_counter() - t0

    if args.mode == "time":
        for m_, a in CONFIGS:  # loads the model, warms every code path up (two steps each)
            sample(m_, a, steps=2)
        times = {f"{m_}:{a}": [] for m_, a in CONFIGS}
        two_branch = {}
        for _ in range(args.repeats):
            for m_, a in CONFIGS:
                times[f"{m_}:{a}"].append(sample(m_, a))
                two_branch[f"{m_}:{a}"] = len(probe.sigmas(True))
        report({"seconds": {k: min(v) for k, v in times.items()},
                "spread": {k: max(v) / min(v) - 1 for k, v in times.items()}, "two_branch_steps": two_branch})
    elif args.mode == "profile":
        from torch.profiler import ProfilerActivity, profile

        sample("ksampler", 0.0, steps=2)
        tables = {}
        for mode, split in (("ksampler", 0.0), ("separate", 0.3)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                sample(mode, split)
            tables[f"{mode}:{split}"] = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10)
        report({"tables": tables, "threads": torch.get_num_threads()})
    else:
        start = reset_peak_rss()
        sample(args.mode, args.split)
        report({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "sampling_mb": (status_mb("VmHWM") - start) if start is not None else None})


def status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(field)


def reset_peak_rss() -> float | None:
    """Reset the process's peak RSS (Linux: clear_refs 5) and return the RSS now, in MB; None elsewhere. The
    peak after sampling minus this is what the sampling itself added (model loading, caches, activations),
    which the process peak hides under ComfyUI's own start-up footprint."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return status_mb("VmRSS")
    except OSError:
        return None


def run_worker(model: str, mode: str, res: int, steps: int, split: float, checkpoint: Path, threads: int,
               repeats: int) -> dict:
    return measure(__spec__.name, ["--model", model, "--mode", mode, "--res", str(res), "--steps", str(steps),
                                   "--split", str(split), "--checkpoint", str(checkpoint), "--threads", str(threads),
                                   "--repeats", str(repeats)])


def load_average() -> float:
    return os.getloadavg()[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--mode", default="time")
    ap.add_argument("--model", default="sd15")
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--split", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--checkpoint", default="")
    ap.add_argument("--threads", type=int, default=1, help="torch threads per worker (1: steadier on a busy machine)")
    ap.add_argument("--setups", default=SETUPS, help=f"comma-separated model:res:steps (default {SETUPS})")
    ap.add_argument("--memory", choices=("process", "none", "only"), default="process",
                    help="peak memory from one process per configuration (default); none: time only (faster); "
                         "only: memory only (the peak needs a few steps, so a short --setups step count will do)")
    ap.add_argument("--profile", action="store_true", help="print the top operations of KSampler and DCI per setup")
    args = ap.parse_args()
    if args.worker:
        worker(args)
        return 0
    setups = [(m, int(r), int(n)) for m, r, n in (x.split(":") for x in args.setups.split(","))]
    lines, rows = [], []
    with tempfile.TemporaryDirectory(prefix="dci-bench-") as tmp:
        checkpoint = Path(tmp) / "tiny_sd15.safetensors"
        for model, res, steps in setups:
            if args.profile:
                out = run_worker(model, "profile", res, steps, 0.0, checkpoint, args.threads, 1)
                for name, table in out["tables"].items():
                    print(f"## {model} {res}px {steps} steps, {name} (threads={out['threads']}, "
                          f"load {load_average():.2f})\n{table}")
                continue
            load0 = load_average()
            if args.memory == "only":  # no timing: memory from one process per configuration
                times = {f"{m}:{a}": float("nan") for m, a in CONFIGS}
                spread, ran = dict.fromkeys(times, float("nan")), dict.fromkeys(times, -1)
            else:
                timed = run_worker(model, "time", res, steps, 0.0, checkpoint, args.threads, args.repeats)
                times, spread, ran = timed["seconds"], timed["spread"], timed["two_branch_steps"]
            if args.memory in ("process", "only"):
                measured = {f"{m}:{a}": run_worker(model, m, res, steps, a, checkpoint, args.threads, 1)
                            for m, a in CONFIGS}
                mem = {k: v["peak_rss_mb"] for k, v in measured.items()}
                own = {k: v["sampling_mb"] for k, v in measured.items()}
            else:  # time only (a peak measured in the timing process would see the allocator's reused memory)
                mem = own = {k: float("nan") for k in times}
            load = max(load0, load_average())
            base = "ksampler:0.0"
            base_t, base_m = times[base], mem[base]
            rows.append(("KSampler", "-", "-", model, res, steps, "-", base_t, spread[base], base_m, own[base], 1.0,
                         1.0, 1.0, "-", load))
            for guidance, split in CONFIGS[1:]:
                key = f"{guidance}:{split}"
                k = ran[key]
                bound = 1 + k / steps if guidance == "separate" else 1 + k / (2 * steps)
                bound = bound if k >= 0 else float("nan")  # --memory only: nothing timed, no count
                tr, mr = times[key] / base_t, mem[key] / base_m
                sr = own[key] / own[base] if own[base] == own[base] and own[base] > 0 else float("nan")
                sp = max(spread[key], spread[base])
                rows.append(("DCI", split, guidance, model, res, steps, k, times[key], spread[key], mem[key], own[key],
                             tr, mr, sr, bound, load))
                lines.append(f"dci_time_ratio={tr:.3f} bound={bound:.2f} mem_ratio={mr:.3f} split={split} "
                             f"guidance={guidance} res={res} two_branch_steps={k} steps={steps} model={model} "
                             f"spread={sp:.3f} load={load:.2f} sampling_mem_ratio={sr:.3f}")
    if args.profile:
        return 0
    print(f"threads={args.threads} repeats={args.repeats} memory={args.memory} (time: min over repeats, interleaved in one process; "
          "spread: max/min - 1 over the repeats; load: highest 1-min load average seen)")
    print(f"{'sampler':8} {'split':>5} {'guidance':>9} {'model':>5} {'res':>4} {'steps':>5} {'2-br':>4} "
          f"{'seconds':>8} {'spread':>6} {'peak MB':>8} {'own MB':>7} {'time x':>7} {'mem x':>6} {'own x':>6} "
          f"{'bound':>5} {'x/bound':>7} {'load':>5}")
    for s, a, g, model, res, steps, k, sec, sp, mb, own_mb, tr, mr, sr, bound, load in rows:
        b = f"{bound:.2f}" if bound != "-" else "-"
        over = f"{tr / bound:.3f}" if bound != "-" else "-"
        print(f"{s:8} {a!s:>5} {g:>9} {model:>5} {res:>4} {steps:>5} {k!s:>4} {sec:8.2f} {sp:6.3f} {mb:8.0f} "
              f"{own_mb:7.0f} {tr:7.3f} {mr:6.3f} {sr:6.3f} {b:>5} {over:>7} {load:5.2f}")
    for line in lines:
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
