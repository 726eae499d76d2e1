"""Where this pack relies on ComfyUI (and torch) internals: the upgrade checklist.

Everything else in the pack uses ComfyUI's public node and patching API (``ModelPatcher.clone`` and its
setters, ``add_wrapper_with_key``, ``add_weight_wrapper``, ``add_patches``, ``get_key_patches``,
``CFGGuider``, ``calc_cond_batch``, ``prepare_noise``, ``folder_paths``). The functions below are the only code
that touches private attributes; each entry names what it assumes and the test that fails when a ComfyUI
update breaks it. Check them all after an upgrade (``make test`` runs every guard).

Replaced by public API in 0.1.0: swapping parameters through ``Module._parameters`` (now ``setattr``), the
guider re-patching its MODEL inside ``sample`` (now patched once; the run travels with each model call), and
the guider class built by a factory and cached in a global (now a module-level ``CFGGuider`` subclass).

Private attributes, touched only here:

1. ``SDTokenizer._try_get_embedding`` (``with_embedding_resolver``): a trigger word is rewritten to an
   ``embedding:`` name that this resolver answers with the learned vectors. Guard: tests/nodes/test_concept_loader.py.
2. ``Tensor.untyped_storage().data_ptr()`` (``storage_key``): the tokenizer output carries row views of our
   vectors; their storage identifies which trigger a vector belongs to (for ``strength_clip``).
   Guard: tests/nodes/test_concept_loader.py (strength of the trigger word).
3. ``comfy.model_management.current_loaded_models`` and module ``weight_function`` lists (``release``): a
   training clone is unloaded and its weight wrappers taken off the shared modules. ComfyUI only wipes weight
   wrappers when another clone loads, and when a clone is garbage-collected its loaded entry is handed to the
   parent MODEL, which would then sample with the clone's wrappers. Guard: tests/nodes/test_trainer.py.
4. The ``extra_options`` dict shared by one block's attn2_patch and attn2 replace patch
   (``stash_attn2_context``): the replace patch gets projected K/V only; ``aux_model`` needs the raw context.
   Guard: tests/nodes/test_dci_sampler.py (aux_model tests).
5. The attributes of a CLIP tokenizer (``encoder_tokenizers``): one ``SDTokenizer`` attribute per text encoder
   with an ``embedding_key`` (clip_l, clip_g, clip_h). Guard: every concept and trainer test.

Structure this pack reads (public attributes, but no documented contract):

6. UNet layout: ``input_blocks``/``middle_block``/``output_blocks`` holding ``SpatialTransformer``s whose
   ``transformer_blocks[i].attn2`` has ``heads``, ``dim_head``, ``to_k``/``to_v`` (``model.cross_attention_layers``);
   ``cond_or_uncond`` lists one chunk per cond and ComfyUI never splits one cond's rows across UNet calls
   (``method.branches.call_rows``; a call that breaks it runs unblended with a warning).
   Guard: tests/nodes/test_dci_branches.py (w = 0 gives each image its own auxiliary row's output).
7. Model families by config class name (``model.FAMILY_OF_CONFIG``). Guard: tests/nodes/test_info_node.py.
8. The CLIP text model's modules and options (``training.text_encoder.text_forward``: embeddings, layers,
   ``layer``/``layer_idx``/``layer_norm_hidden_state``, ``return_projected_pooled``/``text_projection`` and the
   pooled row at the first end token), SDXL's encoder order and ``SDXL.encode_adm``'s size keywords
   (``TextEncoders``, ``TrainingRun._adm``). Guard: tests/nodes/test_trainer.py and test_trainer_sdxl.py
   (reproduce CLIPTextEncode's context and pooled output).
9. ``ResBlock``/``SpatialTransformer`` forward signatures, for gradient checkpointing
   (``training.unet.gradient_checkpointing``). Guard: tests/nodes/test_trainer.py (resume with
   checkpointing is bit-exact).
10. ``prepare_noise`` draws image i's noise as row i of the seed's stream (``sampling.guider.noise_batch_index``).
    Guard: tests/nodes/test_dci_branches.py (DCI Guider with a batch_index latent).
11. The stock LoRA loader accepts per-key ``.diff`` entries (export). Guard: tests/nodes/test_import_export.py.
12. Layout-and-Retouch (``retouch/``): ``SpatialTransformer`` leaves ``activations_shape`` [B, C, H, W] in the
    ``transformer_options`` its attn1/attn2 patches receive; ``cond_or_uncond`` index 0 is the positive;
    ``calc_cond_batch`` also puts ``uuids`` (one per chunk) and ``sigmas`` there, which the APPLY_MODEL wrapper
    extends when it appends the reference and context rows; decoder levels are separated by ``Upsample``
    modules in ``output_blocks``; a sampler callback's ``x`` is the latent at ``sigmas[i]`` (the trajectory).
    Guard: tests/nodes/test_retouch.py (the run itself as both sources reproduces it; cond/uncond rows of a
    batch; the trajectory's first latent is the seed's noise).
13. DCI Apply (``sampling/apply.py``): the OUTER_SAMPLE and PREDICT_NOISE wrappers reach the guider as
    ``executor.class_obj``; its ``conds`` dict holds the run's converted conds (``convert_cond``) when
    OUTER_SAMPLE runs, is processed after it (so an added cond is processed too) and is read by
    ``predict_noise`` at every evaluation; ``model_options`` is the run's own copy during ``outer_sample``.
    Guard: tests/nodes/test_dci_apply.py (the stock KSampler on a DCI Apply model equals DCI KSampler).
"""

from __future__ import annotations

import copy

import comfy.model_management
import torch
from comfy.sd1_clip import SDTokenizer

CONTEXT_KEY = "dci_context"  # where the attn2_patch leaves a block's cross-attention context


def encoder_tokenizers(tokenizer) -> dict[str, SDTokenizer]:
    """Per-encoder tokenizers of a CLIP's tokenizer, keyed by their embedding key (clip_l, clip_g, clip_h)."""
    return {sub.embedding_key: sub for sub in vars(tokenizer).values() if isinstance(sub, SDTokenizer)}


def with_embedding_resolver(sub: SDTokenizer, resolve) -> SDTokenizer:
    """A copy of ``sub`` whose ``embedding:<name>`` lookups ask ``resolve(name, fallback)`` first."""
    fallback = sub._try_get_embedding
    clone = copy.copy(sub)
    if clone.embedding_directory is None:
        # ComfyUI only parses `embedding:` when a directory is set; an empty list finds no files.
        clone.embedding_directory = []
    clone._try_get_embedding = lambda name: resolve(name, fallback)
    return clone


def storage_key(tensor: torch.Tensor) -> int:
    """Identifies the tensor a view was taken from (the tokenizer hands out row views of our vectors)."""
    return tensor.untyped_storage().data_ptr()


def release(patcher) -> None:
    """Unload a clone ComfyUI loaded and take its weight wrappers off the modules it shares with its parent."""
    loaded = comfy.model_management.current_loaded_models
    for i in range(len(loaded) - 1, -1, -1):
        if loaded[i].model is patcher:
            loaded.pop(i).model_unload()
    ours = {id(f) for fs in patcher.weight_wrapper_patches.values() for f in fs}
    for module in patcher.model.modules():
        fs = getattr(module, "weight_function", None)
        if fs and any(id(f) in ours for f in fs):
            module.weight_function = [f for f in fs if id(f) not in ours]


def stash_attn2_context(n, context, value, extra_options):
    """attn2_patch: leaves the block's cross-attention context where the replace patch of the same block finds
    it (a reference in the block's own options dict, gone with the call)."""
    extra_options[CONTEXT_KEY] = (context, value)
    return n, context, value


def stashed_attn2_context(extra_options) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (context, value) ``stash_attn2_context`` left for this block, if it ran."""
    return extra_options.get(CONTEXT_KEY)
