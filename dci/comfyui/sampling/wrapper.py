"""DCI's APPLY_MODEL wrapper (owner key ``dci``): finds the branches' rows in each UNet call.

On a two-branch model call the guider puts a ``StepInfo`` into ``transformer_options``; the wrapper locates the
concept and auxiliary rows from ``cond_or_uncond`` (``branches.call_rows``), tells the attn2 patches which rows
to blend and, with shared guidance, leaves the auxiliary rows' unconditional pass out of the UNet batch and
fills it in with ``branches.shared_uncond``. Without a ``StepInfo`` the wrapper only calls on.
"""

from __future__ import annotations

from dataclasses import dataclass

import comfy.patcher_extension
import torch

from ...method.branches import call_rows, kept_rows, shared_uncond
from .attention import AUX_ROWS_KEY, ROWS_KEY, STEP_KEY, DCIRun, patch_attention

WRAPPER_KEY = "dci"


@dataclass(frozen=True)
class StepInfo:
    """Set by the guider on a two-branch model call: the run, which cond index is which, the image batch B."""

    run: DCIRun
    mixed_index: int
    uncond_index: int | None
    batch: int
    shared: bool


def _select_rows(value, keep: torch.Tensor, total: int):
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == total:
        return value[keep.to(value.device)]
    return value


def apply_model_wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                        **kwargs):
    """Marks the rows to blend and, with shared guidance, skips the auxiliary rows' unconditional pass."""
    transformer_options = transformer_options if transformer_options is not None else {}
    info: StepInfo | None = transformer_options.get(STEP_KEY)
    if info is None:
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    total = x.shape[0]
    rows = call_rows(transformer_options.get("cond_or_uncond", []), total, info.batch, info.mixed_index,
                     info.uncond_index)
    if rows is None:
        info.run.warn_once("layout", "DCI: a UNet call did not contain whole branch pairs (the batch was split "
                                     "unexpectedly); this call runs without the two-branch blend")
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
    drop = info.shared and rows.aux_uncond is not None and control is None
    keep, position = kept_rows(total, rows.aux_uncond if drop else None)
    options = dict(transformer_options)
    if rows.concept is not None:
        options[ROWS_KEY] = (position[rows.concept], position[rows.aux])
        aux = rows.aux if drop or rows.aux_uncond is None else torch.cat([rows.aux, rows.aux_uncond])
        options[AUX_ROWS_KEY] = position[aux]
    if drop:
        options["cond_or_uncond"] = list(options.get("cond_or_uncond", []))
        out_small = executor(x[keep], t[keep], _select_rows(c_concat, keep, total),
                             _select_rows(c_crossattn, keep, total), control, options,
                             **{k: _select_rows(v, keep, total) for k, v in kwargs.items()})
        out = torch.empty((total, *out_small.shape[1:]), dtype=out_small.dtype, device=out_small.device)
        out[keep.to(out.device)] = out_small
    else:
        out = executor(x, t, c_concat, c_crossattn, control, options, **kwargs)
    if info.shared and rows.aux_uncond is not None:
        out[rows.aux_uncond] = shared_uncond(out[rows.concept_uncond], x[rows.concept_uncond], x[rows.aux_uncond])
    return out


def patch_model(model_patcher, aux_kv: bool = False):
    """A clone of MODEL with the DBIM patch on every cross-attention layer and the row wrapper (owner ``dci``).

    The patches are inert until a guider hands them a ``StepInfo``, so the clone samples like the input MODEL.
    """
    m = model_patcher.clone()
    patch_attention(m, aux_kv)
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, apply_model_wrapper)
    return m
