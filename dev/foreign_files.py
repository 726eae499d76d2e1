"""Custom Diffusion results of other tools, built from their documented key layouts, and the import/export
node calls the tests make with them (in-process ComfyUI, ``dev.harness``)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from dci.comfyui.concept import base_kv_weights, kv_weight_keys


def diffusers_names(model) -> dict[str, str]:
    """ComfyUI K/V key → diffusers parameter name, from ComfyUI's own UNet table."""
    import comfy.utils

    table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
    kv = set(kv_weight_keys(model))
    return {"diffusion_model." + c: d for d, c in table.items() if "diffusion_model." + c in kv}


def finetuned(model, seed=0, scale=0.05):
    """Fine-tuned K/V weights (base + noise) in float32, by ComfyUI key."""
    g = torch.Generator().manual_seed(seed)
    return {k: (b.float() + torch.randn(b.shape, generator=g) * scale) for k, b in base_kv_weights(model).items()}


def token_vectors(width, n=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {f"<new{i + 1}>": torch.randn(width, generator=g) * 0.02 for i in range(n)}


def input_dir() -> Path:
    import folder_paths

    return Path(folder_paths.get_input_directory())


def fresh_source(kind: str) -> Path:
    path = input_dir() / f"interop_{kind}_{uuid.uuid4().hex[:8]}"
    path.mkdir(parents=True)
    return path


def write_diffusers(model, width, weights_suffix=".safetensors", n_tokens=2, seed=0) -> tuple[Path, dict, dict]:
    folder = fresh_source("diffusers")
    full = finetuned(model, seed)
    sd = {}
    for key, w in full.items():
        attn, _, proj = diffusers_names(model)[key].rpartition(".to_")
        sd[f"{attn}.processor.to_{proj[0]}_custom_diffusion.weight"] = w
    tokens = token_vectors(width, n_tokens, seed + 1)
    if weights_suffix == ".bin":
        import comfy.utils

        # diffusers' torch.save path lists attention layers without weights as empty dicts
        table = comfy.utils.unet_to_diffusers(model.model.model_config.unet_config)
        placeholders = {d.replace(".to_q.weight", ".processor"): {} for d in table if d.endswith("attn1.to_q.weight")}
        torch.save({**sd, **placeholders}, folder / "pytorch_custom_diffusion_weights.bin")
        for tok, vec in tokens.items():
            torch.save({tok: vec}, folder / f"{tok}.bin")
    else:
        save_file(sd, str(folder / "pytorch_custom_diffusion_weights.safetensors"), metadata={"format": "pt"})
        for tok, vec in tokens.items():  # diffusers writes safetensors content under a .bin name
            save_file({tok: vec}, str(folder / f"{tok}.bin"), metadata={"format": "pt"})
    return folder, full, tokens


def write_adobe(model, width, variant: str, n_tokens=2, seed=0, rank=3) -> tuple[Path, dict, dict, dict]:
    """delta.bin: 'plain' / 'compressed' (diffusers names), 'compvis' / 'compvis-compressed' (ldm names)."""
    folder = fresh_source("adobe")
    full = finetuned(model, seed)
    base = base_kv_weights(model)
    g = torch.Generator().manual_seed(seed + 7)
    factors, entries = {}, {}
    for key, w in full.items():
        name = diffusers_names(model)[key] if not variant.startswith("compvis") else "model." + key
        if variant.endswith("compressed"):
            u, v = torch.randn(w.shape[0], rank, generator=g) * 0.1, torch.randn(rank, w.shape[1], generator=g) * 0.1
            entries[name] = {"u": u, "v": v}
            factors[key] = u @ v
        else:
            entries[name] = w
    tokens = token_vectors(width, n_tokens, seed + 1)
    if variant.startswith("compvis"):
        obj = {"state_dict": {**entries, "embed": torch.stack(list(tokens.values()))}}
    else:
        obj = {"unet": entries, "modifier_token": tokens}
    torch.save(obj, folder / "delta.bin")
    assert set(base) == set(full)
    return folder, full, tokens, factors


def encode(comfy, clip, text):
    (cond,), _ = comfy.run_node("CLIPTextEncode", clip=clip, text=text)
    return cond[0][0]


def sample(comfy, model, clip, text, seed=3, steps=3):
    pos = comfy.run_node("CLIPTextEncode", clip=clip, text=text)[0][0]
    neg = comfy.run_node("CLIPTextEncode", clip=clip, text="")[0][0]
    (latent,) = comfy.run_node("EmptyLatentImage", width=64, height=64, batch_size=1)[0]
    (out,), _ = comfy.run_node("KSampler", model=model, seed=seed, steps=steps, cfg=5.0, sampler_name="euler",
                               scheduler="normal", positive=pos, negative=neg, latent_image=latent, denoise=1.0)
    return out["samples"]


def do_import(comfy, model, clip, source, **kw):
    args = dict(format="auto", trigger="", class_noun="dog", tokens="", save_name=f"interop_{uuid.uuid4().hex[:8]}",
                overwrite=False)
    args.update(kw)
    (m, c, ref), ui = comfy.run_node("DCIImportConcept", model=model, clip=clip, source=str(source), **args)
    return m, c, ref, ui


def do_export(comfy, model, concept_name, target, **kw):
    args = dict(name=f"interop_{uuid.uuid4().hex[:8]}", overwrite=False, precision="exact")
    args.update(kw)
    (paths,), ui = comfy.run_node("DCIExportConcept", model=model, concept_name=concept_name, target=target, **args)
    return [Path(p) for p in paths.splitlines()], ui


def concept_file(ref) -> Path:
    import folder_paths

    return Path(folder_paths.get_folder_paths("concepts")[0]) / ref.name


def assert_same_concept(a, b):
    assert a.kv_deltas.keys() == b.kv_deltas.keys()
    for k in a.kv_deltas:
        assert a.kv_deltas[k].dtype == b.kv_deltas[k].dtype and torch.equal(a.kv_deltas[k], b.kv_deltas[k]), k
    assert a.tokens.keys() == b.tokens.keys()
    assert all(torch.equal(a.tokens[e], b.tokens[e]) for e in a.tokens)
    assert (a.trigger, a.class_noun, a.family) == (b.trigger, b.class_noun, b.family)


def snapshot() -> dict[str, int]:
    """Every file (hidden temporaries included) under the folders imports and exports may write to."""
    import folder_paths

    roots = [folder_paths.get_folder_paths(n)[0] for n in ("concepts", "loras", "embeddings")]
    roots.append(folder_paths.get_output_directory())
    out = {}
    for root in roots:
        for dirpath, _, files in os.walk(root):
            for f in files:
                p = os.path.join(dirpath, f)
                out[p] = os.stat(p).st_mtime_ns
    return out


def reimport_exported(comfy, model, clip, folder: Path, **kw):
    """Copy an exported diffusers folder into the input folder (where imports read) and import it."""
    copy = fresh_source("back")
    shutil.rmtree(copy)
    shutil.copytree(folder, copy)
    return do_import(comfy, model, clip, copy.name, class_noun="", **kw)
