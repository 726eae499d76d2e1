"""Scene descriptors of toy-world images: a small feature vector per image, for the W2 overfitting metric when
no CLIP vision model is connected (plain torch).

The toy world draws one object on a background, so a scene is described by what separates the two: the
background's colour and texture, and the object's colour, amount, position and spread. Nothing here needs the
palette or the renderer: it reads any image, so an image of another world gives a (less meaningful) vector too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SIZE = 32  # images are read at 32×32 (area resampling), whatever their size
BORDER = 2  # pixels of the (32×32) edge read as background
OBJECT_DISTANCE = 0.2  # RGB distance (0..1 per channel) from the background above which a pixel is the object
FEATURES = (
    "background_r", "background_g", "background_b", "background_texture",
    "object_share", "object_x", "object_y", "object_var_x", "object_var_y", "object_cov_xy",
    "object_r", "object_g", "object_b", "object_std_r", "object_std_g", "object_std_b",
    *(f"object_hist_{i}" for i in range(8)),
)


def scene_descriptors(images: torch.Tensor) -> torch.Tensor:
    """ComfyUI IMAGE ``[B, H, W, C]`` (0..1) → ``[B, len(FEATURES)]`` float64 descriptors."""
    if images.dim() != 4 or images.shape[-1] < 3:
        raise ValueError(f"expected an IMAGE batch [B, H, W, 3], got shape {tuple(images.shape)}")
    x = F.interpolate(images[..., :3].float().movedim(-1, 1), size=(SIZE, SIZE), mode="area").double()
    b = x.shape[0]
    border = torch.ones(SIZE, SIZE, dtype=torch.bool)
    border[BORDER:-BORDER, BORDER:-BORDER] = False
    edge = x[:, :, border]  # [B, 3, n]
    bg = edge.median(dim=2).values  # [B, 3]
    texture = edge.std(dim=2).mean(dim=1, keepdim=True)
    dist = (x - bg[:, :, None, None]).pow(2).sum(dim=1).sqrt()  # [B, S, S]
    mask = (dist > OBJECT_DISTANCE).double()
    mass = mask.sum(dim=(1, 2)).clamp(min=1.0)
    share = (mask.sum(dim=(1, 2)) / (SIZE * SIZE)).unsqueeze(1)
    coords = (torch.arange(SIZE, dtype=torch.float64) + 0.5) / SIZE
    ys, xs = coords.view(1, SIZE, 1), coords.view(1, 1, SIZE)
    cx = (mask * xs).sum(dim=(1, 2)) / mass
    cy = (mask * ys).sum(dim=(1, 2)) / mass
    dx, dy = xs - cx.view(b, 1, 1), ys - cy.view(b, 1, 1)
    var_x = (mask * dx.pow(2)).sum(dim=(1, 2)) / mass
    var_y = (mask * dy.pow(2)).sum(dim=(1, 2)) / mass
    cov = (mask * dx * dy).sum(dim=(1, 2)) / mass
    w = mask.unsqueeze(1)
    mean_rgb = (x * w).sum(dim=(2, 3)) / mass.unsqueeze(1)
    std_rgb = ((x - mean_rgb[:, :, None, None]).pow(2) * w).sum(dim=(2, 3)).div(mass.unsqueeze(1)).sqrt()
    bins = ((x > 0.5).long() * torch.tensor([4, 2, 1]).view(1, 3, 1, 1)).sum(dim=1)  # [B, S, S] in 0..7
    hist = torch.stack([((bins == i).double() * mask).sum(dim=(1, 2)) for i in range(8)], dim=1) / mass.unsqueeze(1)
    return torch.cat([bg, texture, share, cx[:, None], cy[:, None], var_x[:, None], var_y[:, None], cov[:, None],
                      mean_rgb, std_rgb, hist], dim=1)
