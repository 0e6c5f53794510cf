"""Classical subcellular-location features: what a bioimage analyst measures before any network.

    feats = LocationFeatures(stats.mean, stats.std)(x)   # normalised [N, C, H, W] -> [N, DIM]

The per-image statistics of the protein (green) stain that pre-deep-learning localisation
classifiers were built on (Murphy's subcellular location features, CellProfiler measurements):
where the stain lies (nucleus, cytoplasm beside the nucleus, the rest of the cytoplasm), how it
co-localises with the reference stains (microtubules in red, nucleus in blue, ER in yellow), and
its structures at six scales in proportion to the image's side: bright blobs (Laplacian of
Gaussian, Hessian determinant), lines (Hessian ridges), dark centres (rings), and counts of
puncta above three strengths. The compartments come from the reference stains: nucleus = blue
above 0.35 of its 99th percentile, cell = red + yellow + green above 0.25 of theirs.
Intensities are relative to the image's own green 99th percentile, so expression level and
exposure cancel.

No parameters and no training: a fixed function of the pixels, batched (one FFT blurs every
scale, the rest is elementwise maps, pooling and batched products), in float32 whatever the
autocast. The refit (fasthpa.train.refit) reads them beside the network's pooled features: on a
small or short run they carry most of the signal for labels the network has seen a handful of
times (the rare labels); where the network has learned more, the fit leans on the network.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SCALES = (0.7, 1.0, 1.5, 2.2, 3.2, 4.5)
"""Gaussian sigmas in pixels of a REFERENCE_SIZE image; they grow with the image's side"""
REFERENCE_SIZE = 128
"""the side at which SCALES, the compartment blurs, the puncta window and area hold as written:
an image of side S is the same field of view at S / REFERENCE_SIZE times the pixels"""
PEAK_LEVELS = (0.05, 0.15, 0.3)
"""Laplacian strengths (relative to the green 99th percentile) above which a local maximum counts"""
_REGIONS = 4  # nucleus, cytoplasm, cytoplasm beside the nucleus, the rest of the cytoplasm
_RESPONSES = 4  # blob (LoG), ridge, Hessian-determinant blob, dark centre
DIM = 2 + 2 * _REGIONS + 4 + 3 + len(SCALES) * (_RESPONSES * (_REGIONS + 2) + 3 * _REGIONS)
"""features per image"""


def _blur(x: torch.Tensor, sigmas: tuple[float, ...]) -> torch.Tensor:
    """[N, len(sigmas), H, W]: Gaussian blurs of [N, 1, H, W] at each sigma, one FFT for all.

    The image is mirrored at its borders first, so that the circular convolution does not wrap
    round, and the kernel is the sampled, normalised Gaussian (SciPy's ``gaussian_filter``),
    not the continuous one, which differs at the small sigmas."""
    h, w = x.shape[-2:]
    pad = min(h - 1, w - 1, math.ceil(4 * max(sigmas)))
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    ky = torch.stack([_sampled_gaussian(xp.shape[-2], s, x.device) for s in sigmas])
    kx = torch.stack([_sampled_gaussian(xp.shape[-1], s, x.device) for s in sigmas])
    transfer = torch.fft.fft(ky)[:, :, None].real * torch.fft.rfft(kx)[:, None, :].real
    out = torch.fft.irfft2(torch.fft.rfft2(xp) * transfer, s=xp.shape[-2:])
    return out[..., pad : pad + h, pad : pad + w]


def _sampled_gaussian(n: int, sigma: float, device: torch.device) -> torch.Tensor:
    """The normalised Gaussian sampled at the integer offsets of a length-``n`` circle."""
    offsets = torch.arange(n, device=device, dtype=torch.float32)
    offsets = torch.minimum(offsets, n - offsets)
    k = torch.exp(-0.5 * (offsets / sigma) ** 2)
    return k / k.sum()


def _hessian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    c = p[..., 1:-1, 1:-1]
    xx = p[..., 1:-1, 2:] + p[..., 1:-1, :-2] - 2 * c
    yy = p[..., 2:, 1:-1] + p[..., :-2, 1:-1] - 2 * c
    xy = (p[..., 2:, 2:] + p[..., :-2, :-2] - p[..., 2:, :-2] - p[..., :-2, 2:]) / 4
    return xx, yy, xy


def _max_filter(x: torch.Tensor, r: int) -> torch.Tensor:
    """The maximum over each (2r+1) x (2r+1) window of [N, C, H, W] (outside counts as -inf):
    a row pass and a column pass (on a CPU, 1.6x faster than the square window at r = 2)."""
    k = 2 * r + 1
    rows = F.max_pool2d(x, (1, k), stride=1, padding=(0, r))
    return F.max_pool2d(rows, (k, 1), stride=1, padding=(r, 0))


def _q(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-image quantile of [N, 1, H, W] on a 2x-subsampled grid, shaped [N, 1, 1, 1]."""
    return torch.quantile(x[..., ::2, ::2].flatten(1), q, dim=1).view(-1, 1, 1, 1)


def _mean_in(v: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """[N, R]: the mean of [N, 1, H, W] over each of [N, R, H, W] masks."""
    return (v * masks).flatten(2).sum(2) / masks.flatten(2).sum(2).clamp_min(1.0)


class LocationFeatures(nn.Module):
    """Normalised images [N, C, H, W] (C = 4: R, G, B, Y; C = 3: R, G, B) -> float32 [N, DIM]."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    @torch.autocast("cuda", enabled=False)
    @torch.autocast("cpu", enabled=False)
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (x.float() * self.std + self.mean).clamp(0.0, 1.0)
        red, green, blue = x[:, 0:1], x[:, 1:2], x[:, 2:3]
        yellow = x[:, 3:4] if x.shape[1] > 3 else torch.zeros_like(red)
        f = min(x.shape[-2:]) / REFERENCE_SIZE
        masks, cell = _compartments(red, green, blue, yellow, f)
        g = green / _q(green, 0.99).clamp_min(1e-3)
        out = [cell.flatten(1).mean(1, keepdim=True), _mean_in(masks[:, :1], cell)]
        mass = (g * cell).flatten(1).sum(1, keepdim=True).clamp_min(1e-3)
        out += [(g * masks).flatten(2).sum(2) / mass, _mean_in(g, masks)]
        gc = (g[..., ::2, ::2] * cell[..., ::2, ::2]).flatten(1)  # the grid _q reads
        out.append(
            torch.quantile(gc, torch.tensor([0.5, 0.8, 0.95, 0.99], device=gc.device), dim=1).T
        )
        out.append(_colocalisation(g, (red, blue, yellow), cell))
        sigmas = tuple(s * f for s in SCALES)
        out.append(_scale_space(_blur(g, sigmas), sigmas, masks, cell, f))
        return torch.cat(out, 1)


def _compartments(red, green, blue, yellow, f: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[N, 4, H, W] masks (nucleus, cytoplasm, near, far) and the [N, 1, H, W] cell mask."""
    b = _blur(blue, (1.5 * f,))
    c = _blur(red + yellow + green, (2.0 * f,))
    nucleus = (b > 0.35 * _q(b, 0.99).clamp_min(1e-3)).float()
    cell = torch.maximum((c > 0.25 * _q(c, 0.99).clamp_min(1e-3)).float(), nucleus)
    cyto = cell * (1.0 - nucleus)
    near = (_blur(nucleus, (3.0 * f,)) > 0.1).float() * cyto
    return torch.cat([nucleus, cyto, near, cyto * (1.0 - near)], 1), cell


def _colocalisation(g, others, cell) -> torch.Tensor:
    """[N, 3]: Pearson correlation of the green stain with each reference stain in the cell."""

    def centred(v):
        return (v - _mean_in(v, cell).view(-1, 1, 1, 1)) * cell

    a = centred(g)
    cols = []
    for other in others:
        o = centred(other)
        den = ((a * a).flatten(1).sum(1) * (o * o).flatten(1).sum(1)).sqrt().clamp_min(1e-6)
        cols.append((a * o).flatten(1).sum(1) / den)
    return torch.stack(cols, 1)


def _scale_space(gs, sigmas, masks, cell, f: float) -> torch.Tensor:
    """[N, S * (R * (regions + 2) + 3 * regions)]: the green blurred at ``sigmas`` [N, S, H, W],
    its responses by compartment, their upper quantiles in the cell, and its puncta counts
    (local maxima in a window of 5 f px, per 400 f^2 px of cell)."""
    n = gs.shape[0]
    xx, yy, xy = _hessian(gs)
    s2 = torch.tensor(sigmas, dtype=gs.dtype, device=gs.device).view(1, -1, 1, 1) ** 2
    trace = xx + yy
    disc = ((xx - yy) ** 2 / 4 + xy * xy).sqrt()
    high, low = trace / 2 + disc, trace / 2 - disc  # low: the most negative curvature
    log = -trace * s2  # > 0 on a bright blob of about this size
    ridge = (torch.relu(-low) - torch.relu(-high)) * s2  # > 0 on a bright line
    blob = (torch.relu(xx * yy - xy * xy) * (trace < 0)).sqrt() * s2
    dark = torch.relu(-log)  # > 0 at a dark centre (inside a ring)
    resp = torch.stack([log, ridge, blob, dark], 2).flatten(1, 2)  # [N, S*R, H, W]
    area = masks.flatten(2).sum(2).clamp_min(1.0)  # [N, regions]
    m = masks.flatten(2).transpose(1, 2)  # [N, HW, regions]
    means = torch.bmm(resp.flatten(2), m) / area[:, None, :]  # [N, S*R, regions]
    sub = (resp[..., ::2, ::2] * cell[..., ::2, ::2]).flatten(2)  # the grid _q reads
    quants = torch.quantile(sub, torch.tensor([0.9, 0.99], device=gs.device), dim=2)
    peaks = (log == _max_filter(log, max(1, round(2 * f)))) & (log > 0)
    per_area = cell.flatten(1).sum(1).clamp_min(1.0).view(-1, 1, 1) / (400.0 * f * f)
    levels = torch.tensor(PEAK_LEVELS, device=gs.device).view(1, 1, -1, 1, 1)
    counted = (peaks[:, :, None] & (log[:, :, None] > levels)).float().flatten(1, 2)
    counts = torch.bmm(counted.flatten(2), m) / per_area  # [N, S*levels, regions]
    return torch.cat(
        [means.reshape(n, -1), quants.permute(1, 2, 0).reshape(n, -1), counts.reshape(n, -1)], 1
    )
