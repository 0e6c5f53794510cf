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

No parameters and no training: a fixed function of the pixels, batched (two matrix products
blur every scale, the rest is elementwise maps, pooling and batched products), in float32
whatever the autocast, with TF32 off on CUDA. The refit (fasthpa.train.refit) reads them beside
the network's pooled features: on a small or short run they carry most of the signal for labels
the network has seen a handful of times (the rare labels); where the network has learned more,
the fit leans on the network.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from fasthpa.runtime import ieee_fp32_matmuls

SCALES = (0.7, 1.0, 1.5, 2.2, 3.2, 4.5)
"""Gaussian sigmas in pixels of a REFERENCE_SIZE image; they grow with the image's side"""
REFERENCE_SIZE = 128
"""the side at which SCALES, the compartment blurs, the puncta window and area hold as written:
an image of side S is the same field of view at S / REFERENCE_SIZE times the pixels"""
PEAK_LEVELS = (0.05, 0.15, 0.3)
"""Laplacian strengths (relative to the green 99th percentile) above which a local maximum counts"""
CHUNK_PIXELS = {"cpu": 1 << 19, "cuda": 1 << 22}
"""images per pass, by device: at most this many pixels. It bounds the memory of the
full-resolution responses (about 20 float32 maps of 6 scales each) whatever the batch; on a CPU
the smaller passes also run faster, their maps nearer the caches (measured on a 2-core EPYC:
2 images at 512 px 99 ms/img against 221 for 8; 32 at 128 px 3.2 ms/img against 4.4 for 256)"""
_REGIONS = 4  # nucleus, cytoplasm, cytoplasm beside the nucleus, the rest of the cytoplasm
_RESPONSES = 4  # blob (LoG), ridge, Hessian-determinant blob, dark centre
DIM = 2 + 2 * _REGIONS + 4 + 3 + len(SCALES) * (_RESPONSES * (_REGIONS + 2) + 3 * _REGIONS)
"""features per image"""


def _blur(x: torch.Tensor, sigmas: tuple[float, ...]) -> torch.Tensor:
    """[N, len(sigmas), H, W]: Gaussian blurs of [N, 1, H, W] at each sigma, exactly SciPy's
    ``gaussian_filter(mode="mirror")``: two matrix products (rows, then columns), whose
    matrices hold the sampled, normalised Gaussian truncated at 4 sigma with the mirrored
    borders folded in. On a CPU at 128 px, 3.7x faster than one mirrored FFT for every scale."""
    n, _, h, w = x.shape
    ky = torch.cat([_blur_matrix(h, s, x.device) for s in sigmas], 0)  # [S * H, H]
    cols = ky @ x.reshape(n, h, w).permute(1, 0, 2).reshape(h, n * w)  # [S * H, N * W]
    kx = torch.stack([_blur_matrix(w, s, x.device) for s in sigmas])  # [S, W, W]
    out = cols.view(len(sigmas), h * n, w) @ kx.transpose(1, 2)  # [S, H * N, W]
    return out.view(len(sigmas), h, n, w).permute(2, 0, 1, 3).contiguous()


@functools.lru_cache(maxsize=64)
def _blur_matrix(n: int, sigma: float, device: torch.device) -> torch.Tensor:
    """float32 [n, n] M with (M @ v)[i] = sum_d k[d] v[mirror(i + d)], k the Gaussian sampled at
    the integer offsets |d| <= int(4 sigma + 0.5) and normalised (SciPy's kernel); mirror
    reflects about the end pixels (d c b | a b c d | c b a), as often as the radius needs."""
    radius = int(4.0 * sigma + 0.5)
    d = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (d / sigma) ** 2)
    k /= k.sum()
    src = torch.arange(n)[:, None] + d.long()[None, :]
    period = max(2 * n - 2, 1)
    src = src % period
    src = torch.where(src > n - 1, period - src, src)
    m = torch.zeros(n, n, dtype=torch.float64)
    m.scatter_add_(1, src, k.expand(n, -1).contiguous())
    return m.float().to(device)


def _hessian(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    c = p[..., 1:-1, 1:-1]
    xx = p[..., 1:-1, 2:] + p[..., 1:-1, :-2] - 2 * c
    yy = p[..., 2:, 1:-1] + p[..., :-2, 1:-1] - 2 * c
    xy = (p[..., 2:, 2:] + p[..., :-2, :-2] - p[..., 2:, :-2] - p[..., :-2, 2:]) / 4
    return xx, yy, xy


def _max_filter(x: torch.Tensor, r: int) -> torch.Tensor:
    """The maximum over each (2r+1) x (2r+1) window of [N, C, H, W] (outside counts as -inf):
    a row pass and a column pass of shifted maxima (on a CPU, 2x faster than max_pool2d,
    which also computes the indices)."""
    return _max_1d(_max_1d(x, r, 3), r, 2)


def _max_1d(x: torch.Tensor, r: int, dim: int) -> torch.Tensor:
    """Windows of 2r+1 along ``dim`` by doubling: maxima over spans of 1, 2, 4, ... up to the
    largest power of two within the window, then two such spans, which cover it (log2 of the
    window in passes, not 2r)."""
    n, window = x.shape[dim], 2 * r + 1
    pad = (r, r, 0, 0) if dim == 3 else (0, 0, r, r)
    m, span = F.pad(x, pad, value=float("-inf")), 1  # m[i] = max of the padded p[i : i + span]
    while 2 * span <= window:
        k = m.shape[dim] - span
        m, span = torch.maximum(m.narrow(dim, 0, k), m.narrow(dim, span, k)), 2 * span
    return torch.maximum(m.narrow(dim, 0, n), m.narrow(dim, window - span, n))


def _q(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-image quantile of [N, 1, H, W] on a 2x-subsampled grid, shaped [N, 1, 1, 1]."""
    return torch.quantile(x[..., ::2, ::2].flatten(1), q, dim=1).view(-1, 1, 1, 1)


def _upper_quantiles(x: torch.Tensor, qs: tuple[float, ...]) -> torch.Tensor:
    """``torch.quantile(x, qs, dim=-1)`` (linear interpolation) for upper quantiles, from a
    partial sort of the top of each row: [len(qs), *x.shape[:-1]] (on a CPU, 1.8x faster)."""
    n = x.shape[-1]
    ranks = [q * (n - 1) for q in qs]
    top = torch.topk(x, n - math.floor(min(ranks)), dim=-1).values  # top[..., j]: rank n-1-j
    out = []
    for rank in ranks:
        lo = math.floor(rank)
        below, above = top[..., n - 1 - lo], top[..., max(n - 2 - lo, 0)]
        out.append(torch.lerp(below, above, rank - lo))
    return torch.stack(out)


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
        budget = CHUNK_PIXELS.get(x.device.type, CHUNK_PIXELS["cpu"])
        step = max(1, budget // (x.shape[-2] * x.shape[-1]))
        # TF32 (the trainer's, for the network) would round the blurs that the Hessian's
        # second differences and the puncta counts read
        with ieee_fp32_matmuls(x.device):
            return torch.cat([self._features(part) for part in x.split(step)])

    def _features(self, x: torch.Tensor) -> torch.Tensor:
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
    area = masks.flatten(2).sum(2).clamp_min(1.0)  # [N, regions]
    m = masks.flatten(2).transpose(1, 2)  # [N, HW, regions]
    sub_cell = cell[..., ::2, ::2].flatten(2)  # the grid _q reads
    means, subs = [], []
    for r in (log, ridge, blob, dark):
        means.append(torch.bmm(r.flatten(2), m) / area[:, None, :])  # [N, S, regions]
        subs.append(r[..., ::2, ::2].flatten(2) * sub_cell)
    means = torch.stack(means, 2)  # [N, S, R, regions]
    quants = _upper_quantiles(torch.stack(subs, 2), (0.9, 0.99))  # [2, N, S, R]
    peaks = (log == _max_filter(log, max(1, round(2 * f)))) & (log > 0)
    per_area = cell.flatten(1).sum(1).clamp_min(1.0).view(-1, 1, 1) / (400.0 * f * f)
    levels = torch.tensor(PEAK_LEVELS, device=gs.device).view(1, 1, -1, 1, 1)
    counted = (peaks[:, :, None] & (log[:, :, None] > levels)).float().flatten(1, 2)
    counts = torch.bmm(counted.flatten(2), m) / per_area  # [N, S*levels, regions]
    return torch.cat(
        [means.reshape(n, -1), quants.permute(1, 2, 3, 0).reshape(n, -1), counts.reshape(n, -1)], 1
    )
