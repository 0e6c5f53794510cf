"""Write a synthetic dataset in the Kaggle HPA layout: cells in four stains, one green motif per label.

Real HPA data cannot be downloaded everywhere, yet every test, demo and CPU benchmark needs data.
This module writes exactly the Kaggle layout, so everything downstream reads it like the real thing::

    fasthpa synth data/synth --n 2000 --size 128 --test-n 500 --seed 0 --workers 2

    OUT/train.csv                  Id,Target   (Target: space-separated label indices, e.g. "16 0")
    OUT/train/{Id}_{red,green,blue,yellow}.png   8-bit grayscale, size x size
    OUT/test/{Id}_{stain}.png      only with --test-n
    OUT/sample_submission.csv      Id,Predicted  ("0" in every row, like Kaggle's)
    OUT/test_labels.csv            Id,Target   (the hidden truth for the test split)

From Python::

    from fasthpa.data.synth import generate, render_sample, sample_labels
    summary = generate("data/synth", n=2000, size=128, test_n=500, seed=0, workers=2)
    image = render_sample([0, 25], size=128, rng=np.random.default_rng(0))  # uint8 [S, S, 4] RGBY
    labels = sample_labels(2000, np.random.default_rng(0))  # list of label tuples, no images

What is realistic and what is not:
- Label frequencies follow the Kaggle train.csv counts (scaled; every label at least 3 times once
  there are enough label slots), 1-3 labels per sample in the real proportions (4+ folded into 3)
  and the real common pairs (Nucleoplasm + Cytosol above all).
- Each image holds a few touching cells: nucleus (blue), radial microtubule fibres (red), a
  reticular ER mesh (yellow), and in green the sum of one spatial motif per label (see
  ``_MOTIFS``). Per-cell expression, exposure, optical blur, shot and read noise, mitotic cells
  and cytokinetic bridges in the red stain of unlabelled images keep it from being trivial.
- Output is a pure function of the seed: each sample draws from its own random stream, so the
  bytes are the same whatever ``--workers`` is.
"""

from __future__ import annotations

import argparse
import functools
import io
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fasthpa.errors import UserError
from fasthpa.io import atomic_write_text, make_dir
from fasthpa.labels import CHANNELS, KAGGLE_TRAIN_COUNTS, NUM_LABELS

# Samples with 1, 2, 3 labels in the Kaggle train.csv (15,126 / 12,485 / 3,160); the 299 samples
# with 4 labels and the 2 with 5 are folded into 3 so every synthetic sample has 1-3 labels.
LABELS_PER_SAMPLE_COUNTS: tuple[int, ...] = (15126, 12485, 3160 + 299 + 2)
MIN_LABEL_COUNT = 3  # every label at least this often once there are 3 * 28 label slots
MIN_SIZE = 16
SPLITS = ("train", "test")

# Affinity multipliers for pairs that co-occur more often than their frequencies imply, from the
# biology (and the real train.csv: Nucleoplasm + Cytosol is by far the commonest pair).
_AFFINITY_PAIRS: dict[tuple[int, int], float] = {
    (0, 25): 4.0,  # Nucleoplasm + Cytosol
    (0, 5): 2.0,  # Nucleoplasm + Nuclear bodies
    (0, 2): 1.5,  # Nucleoplasm + Nucleoli
    (0, 21): 1.5,  # Nucleoplasm + Plasma membrane
    (21, 25): 2.0,  # Plasma membrane + Cytosol
    (23, 25): 1.5,  # Mitochondria + Cytosol
    (2, 3): 3.0,  # Nucleoli + Nucleoli fibrillar center
    (12, 13): 3.0,  # Actin filaments + Focal adhesion sites
    (14, 15): 4.0,  # Microtubules + Microtubule ends
    (14, 17): 2.0,  # Microtubules + Mitotic spindle
    (16, 17): 3.0,  # Cytokinetic bridge + Mitotic spindle
    (18, 19): 4.0,  # MTOC + Centrosome
    (21, 22): 3.0,  # Plasma membrane + Cell junctions
    (11, 25): 1.5,  # Intermediate filaments + Cytosol
    (7, 25): 1.5,  # Golgi + Cytosol
}

_F = np.float32
_STREAM_LABELS, _STREAM_IDS, _STREAM_IMAGE = 1, 2, 3  # independent random streams per purpose
_PNG_NAME = re.compile(r"^[0-9a-f-]+_(red|green|blue|yellow)\.png$")
_OUR_CSVS = ("train.csv", "test_labels.csv", "sample_submission.csv")


# ----------------------------------------------------------------------------------------------
# Labels and Ids
# ----------------------------------------------------------------------------------------------


def _largest_remainder(shares: np.ndarray, total: int) -> np.ndarray:
    """Round non-negative ``shares`` to integers summing to ``total`` (Hamilton's method)."""
    floors = np.floor(shares).astype(np.int64)
    short = total - int(floors.sum())
    if short > 0:
        # stable sort: ties go to the lower index, so the result never depends on chance
        order = np.argsort(-(shares - floors), kind="stable")
        floors[order[:short]] += 1
    return floors


def label_quotas(total: int, rng: np.random.Generator) -> np.ndarray:
    """How often each of the 28 labels appears when ``total`` label slots are filled.

    Proportional to the Kaggle counts, with every label given at least ``min(3, total // 28)``
    slots (water-filling: labels below the floor are lifted to it and the rest share what is
    left). With fewer than 28 slots, ``total`` distinct labels are drawn (weighted by count) so
    that as many labels as possible appear. ``rng`` is only used in that last case.
    """
    counts = np.asarray(KAGGLE_TRAIN_COUNTS, dtype=np.float64)
    if total < NUM_LABELS:
        quotas = np.zeros(NUM_LABELS, dtype=np.int64)
        if total > 0:
            pick = rng.choice(NUM_LABELS, size=total, replace=False, p=counts / counts.sum())
            quotas[pick] = 1
        return quotas
    floor = min(MIN_LABEL_COUNT, total // NUM_LABELS)
    fixed = np.zeros(NUM_LABELS, dtype=bool)
    while True:  # each pass only adds labels to `fixed`, so this ends within 28 passes
        scale = (total - floor * fixed.sum()) / counts[~fixed].sum()
        below = ~fixed & (scale * counts < floor)
        if not below.any():
            break
        fixed |= below
    shares = np.where(fixed, float(floor), scale * counts)
    return _largest_remainder(shares, total)


@functools.lru_cache(maxsize=1)
def _affinity() -> np.ndarray:
    a = np.ones((NUM_LABELS, NUM_LABELS))
    for (i, j), w in _AFFINITY_PAIRS.items():
        a[i, j] = a[j, i] = w
    return a


def sample_labels(n: int, rng: np.random.Generator) -> list[tuple[int, ...]]:
    """Draw label sets for ``n`` samples: ``[(16, 0), (25,), ...]``, labels in drawn order.

    The number of labels per sample follows the real 1/2/3 proportions exactly (rounded); label
    totals follow :func:`label_quotas`. Labels are dealt from that pool without replacement, the
    multi-label samples first (so a sample never runs out of distinct labels: the single-label
    samples at the end take whatever is left); within a sample, each further label is weighted
    by the pair affinities, which gives realistic co-occurrence. Cheap: no images are drawn.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    per_sample = _largest_remainder(
        np.asarray(LABELS_PER_SAMPLE_COUNTS) * n / sum(LABELS_PER_SAMPLE_COUNTS), n
    )
    k = np.repeat(np.arange(1, len(per_sample) + 1), per_sample)
    k = k[rng.permutation(n)]
    remaining = label_quotas(int(k.sum()), rng).astype(np.float64)
    affinity = _affinity()
    fallback = np.asarray(KAGGLE_TRAIN_COUNTS, dtype=np.float64)
    out: list[tuple[int, ...]] = [()] * n
    for i in np.argsort(-k, kind="stable"):
        chosen: list[int] = []
        weight_of = np.ones(NUM_LABELS)
        for _ in range(k[i]):
            w = remaining * weight_of
            w[chosen] = 0.0
            if w.sum() <= 0:  # pool has no distinct label left (tiny n): go over quota
                w = fallback * weight_of
                w[chosen] = 0.0
            cdf = np.cumsum(w)
            c = int(min(np.searchsorted(cdf, rng.random() * cdf[-1], side="right"), 27))
            chosen.append(c)
            remaining[c] = max(remaining[c] - 1.0, 0.0)
            weight_of = weight_of * affinity[c]
        out[i] = tuple(chosen)
    return out


def make_ids(n: int, rng: np.random.Generator) -> list[str]:
    """``n`` distinct uuid-like Ids shaped like Kaggle's (``00070df0-bbc3-11e8-b2bc-ac1f6b6435d0``)."""
    ids: set[str] = set()
    out: list[str] = []
    while len(out) < n:
        m = n - len(out)
        a = rng.integers(0, 2**32, size=m, dtype=np.uint64)
        b = rng.integers(0, 2**16, size=m, dtype=np.uint64)
        c = rng.integers(0x8000, 0xC000, size=m, dtype=np.uint64)  # RFC 4122 variant bits
        d = rng.integers(0, 2**48, size=m, dtype=np.uint64)
        for ai, bi, ci, di in zip(a.tolist(), b.tolist(), c.tolist(), d.tolist()):
            s = f"{ai:08x}-{bi:04x}-11e8-{ci:04x}-{di:012x}"
            if s not in ids:
                ids.add(s)
                out.append(s)
    return out


def sample_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The random stream that draws image ``index`` of ``split``: independent of worker count."""
    return np.random.default_rng([seed, _STREAM_IMAGE, SPLITS.index(split), index])


# ----------------------------------------------------------------------------------------------
# Image primitives (vectorised numpy, float32)
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(size, dtype=_F) + _F(0.5)  # pixel centres
    return c[:, None], c[None, :]


@functools.lru_cache(maxsize=8)
def _freq_radius(size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    return np.sqrt(fy**2 + fx**2).astype(_F)


def _noise(rng: np.random.Generator, size: int, specs: Sequence[tuple[float, bool]]) -> np.ndarray:
    """Gaussian random fields, one per ``(wavelength_px, band)``, unit std, shape [k, S, S].

    ``band`` keeps a ring of frequencies around 1/wavelength (blobs and meshes of that size);
    otherwise a low-pass field smooth on that scale. One batched FFT pair for all of them.
    """
    fr = _freq_radius(size)
    filters = []
    for wavelength, band in specs:
        f0 = 1.0 / max(float(wavelength), 2.0)
        if band:
            filters.append(np.exp(-0.5 * ((fr - f0) / (0.45 * f0)) ** 2))
        else:
            filters.append(np.exp(-0.5 * (fr / f0) ** 2))
    white = rng.standard_normal((len(specs), size, size), dtype=_F)
    out = np.fft.irfft2(np.fft.rfft2(white) * np.stack(filters), s=(size, size)).astype(_F)
    out -= out.mean(axis=(1, 2), keepdims=True)
    out /= out.std(axis=(1, 2), keepdims=True) + _F(1e-6)
    return out


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur over the first two axes (reflected edges), trailing axes kept."""
    if sigma < 0.25:
        return a
    r = max(1, int(3.0 * sigma + 0.5))
    x = np.arange(-r, r + 1, dtype=np.float64)
    k = np.exp(-0.5 * (x / sigma) ** 2)
    k = (k / k.sum()).astype(_F)
    s0, s1 = a.shape[0], a.shape[1]
    pad = [(r, r), (0, 0)] + [(0, 0)] * (a.ndim - 2)
    p = np.pad(a, pad, mode="reflect")
    out = k[0] * p[0:s0]
    for i in range(1, 2 * r + 1):
        out += k[i] * p[i : i + s0]
    pad = [(0, 0), (r, r)] + [(0, 0)] * (a.ndim - 2)
    p = np.pad(out, pad, mode="reflect")
    out = k[0] * p[:, 0:s1]
    for i in range(1, 2 * r + 1):
        out += k[i] * p[:, i : i + s1]
    return out


def _stamp(
    size: int,
    ys: np.ndarray,
    xs: np.ndarray,
    half: int,
    value: Callable[[np.ndarray, np.ndarray], np.ndarray],
) -> np.ndarray:
    """Sum small objects into an [S, S] image in one vectorised pass.

    Object p sits at sub-pixel ``(ys[p], xs[p])``; ``value(dy, dx)`` gets [P, W, W] offsets (in
    pixels, W = 2 * half + 1) from each object's centre and returns its intensity there.
    """
    out = np.zeros(size * size, dtype=np.float64)
    if len(ys) == 0:
        return out.reshape(size, size).astype(_F)
    off = np.arange(-half, half + 1)
    py = np.floor(ys).astype(np.int64)[:, None, None] + off[None, :, None]
    px = np.floor(xs).astype(np.int64)[:, None, None] + off[None, None, :]
    dy = (py + 0.5 - ys[:, None, None]).astype(_F)
    dx = (px + 0.5 - xs[:, None, None]).astype(_F)
    vals = np.broadcast_to(value(dy, dx), (len(ys), 2 * half + 1, 2 * half + 1))
    valid = (py >= 0) & (py < size) & (px >= 0) & (px < size)
    flat = np.broadcast_to(py * size + px, valid.shape)
    out += np.bincount(flat[valid], weights=vals[valid], minlength=size * size)
    return out.reshape(size, size).astype(_F)


def _gaussians(size: int, ys, xs, sigma, amp) -> np.ndarray:
    ys, xs = np.asarray(ys, np.float64), np.asarray(xs, np.float64)
    sigma = np.broadcast_to(np.asarray(sigma, _F), ys.shape)[:, None, None]
    amp = np.broadcast_to(np.asarray(amp, _F), ys.shape)[:, None, None]
    half = int(np.ceil(3.0 * float(sigma.max()))) if len(ys) else 0
    return _stamp(
        size, ys, xs, half, lambda dy, dx: amp * np.exp(-(dy * dy + dx * dx) / (2 * sigma**2))
    )


def _sample_points(
    weight: np.ndarray, n: int, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """``n`` sub-pixel points drawn with density proportional to the [S, S] ``weight`` map."""
    size = weight.shape[0]
    cdf = np.cumsum(weight.ravel(), dtype=np.float64)
    if n <= 0 or cdf[-1] <= 0:
        return np.zeros(0), np.zeros(0)
    idx = np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), size * size - 1)
    return idx // size + rng.random(n), idx % size + rng.random(n)


def _lines(phase: np.ndarray, spacing_px, width_px) -> np.ndarray:
    """Thin lines where ``phase`` is an integer; ``spacing_px`` converts phase to pixels."""
    d = np.abs(phase - np.round(phase)) * spacing_px
    return np.exp(-0.5 * (d / width_px) ** 2)


def _soft(x: np.ndarray, width: float) -> np.ndarray:
    return np.clip(x / _F(width), 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# The scene: cell geometry shared by the four stains
# ----------------------------------------------------------------------------------------------


@dataclass
class _Scene:
    """Per-image geometry. Per-cell arrays have length K; per-pixel maps are [S, S] float32."""

    size: int
    cx: np.ndarray
    cy: np.ndarray
    r: np.ndarray  # cell radius, px
    ncx: np.ndarray
    ncy: np.ndarray
    rn: np.ndarray  # nucleus radius, px
    cell_id: np.ndarray  # nearest cell per pixel
    rho: np.ndarray  # normalised radius in own cell: 0 centre, 1 membrane
    rho2: np.ndarray  # same for the second-nearest cell (junctions)
    theta: np.ndarray  # angle around own cell centre, cell frame
    nu: np.ndarray  # normalised radius in own nucleus
    alpha: np.ndarray  # angle around own nucleus centre, image frame
    r_px: np.ndarray  # own cell radius per pixel
    rn_px: np.ndarray
    cell_soft: np.ndarray
    nuc_soft: np.ndarray
    cyto_soft: np.ndarray
    tex: np.ndarray  # smooth texture in [0, 1]
    mitotic: int  # index of the dividing cell, -1 if none
    per_cell: dict[str, np.ndarray] = field(default_factory=dict)  # shared per-cell draws
    nucleoli: tuple[np.ndarray, np.ndarray, np.ndarray] = ()  # ys, xs, sigma

    @property
    def n_cells(self) -> int:
        return len(self.cx)

    def g(self, name: str) -> np.ndarray:
        """Per-cell value ``name`` gathered to every pixel."""
        return self.per_cell[name][self.cell_id]


def _place_centres(size: int, rbar: float, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to ``k`` (at least 2) centres grown as a colony: each new cell beside an earlier one.

    Neighbours closer than two radii share a membrane (cell junctions, bridges); none are
    closer than 1.4 radii, so every cell keeps most of its shape.
    """
    lo, hi = 0.05 * size, 0.95 * size
    pts = [(rng.uniform(0.2 * size, 0.8 * size), rng.uniform(0.2 * size, 0.8 * size))]
    for _ in range(60):
        if len(pts) == k:
            break
        a, b = pts[int(rng.integers(len(pts)))]
        ang, dist = rng.uniform(0, 2 * np.pi), rbar * rng.uniform(1.5, 1.9)
        x, y = a + dist * np.cos(ang), b + dist * np.sin(ang)
        if not (lo <= x <= hi and lo <= y <= hi):
            continue
        if all((x - c) ** 2 + (y - d) ** 2 >= (1.4 * rbar) ** 2 for c, d in pts):
            pts.append((x, y))
    if len(pts) == 1:  # bridges and junctions need a neighbour: put one towards the centre
        a, b = pts[0]
        ang = np.arctan2(size / 2 - b, size / 2 - a) if (a, b) != (size / 2, size / 2) else 0.0
        pts.append((a + 1.6 * rbar * np.cos(ang), b + 1.6 * rbar * np.sin(ang)))
    return np.asarray(pts, dtype=np.float64)


def _make_scene(size: int, rng: np.random.Generator, mitotic: bool) -> _Scene:
    """A few touching cells: who owns each pixel, its radius in the cell and in the nucleus,
    and the per-cell properties stains and motifs share (random draws in a fixed order)."""
    yy, xx = _grid(size)
    cells = _draw_cells(size, rng, mitotic)
    cell_id, rho, rho2, theta = _cell_fields(xx, yy, cells)
    ncx, ncy, rn, nu, alpha = _nucleus_fields(xx, yy, cells, cell_id, rng)
    m = cells["m"]
    cell_soft = _soft(1.0 - rho, 0.06)
    nuc_soft = _soft(1.0 - nu, 0.1) * cell_soft
    if m >= 0:  # the envelope of a dividing cell has broken down: no nucleus, chromosomes
        nuc_soft = np.where(cell_id == m, _F(0), nuc_soft)
    (tex,) = _noise(rng, size, [(float(cells["rbar"]) * 0.6, False)])
    tex = np.clip(0.5 + 0.25 * tex, 0.0, 1.0)
    r = cells["r"]
    scene = _Scene(
        size=size,
        cx=cells["cx"],
        cy=cells["cy"],
        r=r,
        ncx=ncx,
        ncy=ncy,
        rn=rn,
        cell_id=cell_id,
        rho=rho,
        rho2=rho2,
        theta=theta,
        nu=nu,
        alpha=alpha,
        r_px=r[cell_id],
        rn_px=rn[cell_id],
        cell_soft=cell_soft,
        nuc_soft=nuc_soft,
        cyto_soft=cell_soft * (1.0 - nuc_soft),
        tex=tex,
        mitotic=m,
    )
    scene.per_cell = _per_cell_properties(rng, len(r), r)
    scene.nucleoli = _nucleoli(rng, ncx, ncy, rn, m)
    return scene


def _draw_cells(size: int, rng: np.random.Generator, mitotic: bool) -> dict:
    rbar = size * rng.uniform(0.15, 0.2)
    centres = _place_centres(size, rbar, int(rng.integers(3, 8)), rng)
    k = len(centres)
    cells = {
        "rbar": rbar,
        "cx": centres[:, 0].astype(_F),
        "cy": centres[:, 1].astype(_F),
        "r": (rbar * rng.uniform(0.85, 1.15, k)).astype(_F),
        "aspect": rng.uniform(1.0, 1.35, k).astype(_F),
        "phi": rng.uniform(0, np.pi, k).astype(_F),
        "wob_c": rng.uniform(0, 0.06, (k, 3)).astype(_F),
        "wob_p": rng.uniform(0, 2 * np.pi, (k, 3)).astype(_F),
    }
    m = int(rng.integers(k)) if mitotic else -1
    if m >= 0:  # a dividing cell rounds up
        cells["aspect"][m] = 1.0
        cells["wob_c"][m] *= 0.3
    cells["m"] = m
    return cells


def _cell_fields(xx, yy, cells: dict):
    """Every cell's normalised radius at every pixel; the nearest cell owns the pixel:
    (owner, radius in it, second-smallest radius, angle)."""
    dx = xx[None] - cells["cx"][:, None, None]
    dy = yy[None] - cells["cy"][:, None, None]
    c, s = np.cos(cells["phi"])[:, None, None], np.sin(cells["phi"])[:, None, None]
    u, v = dx * c + dy * s, -dx * s + dy * c
    a = cells["aspect"][:, None, None]
    th = np.arctan2(v, u)
    wob_c, wob_p = cells["wob_c"], cells["wob_p"]
    wob = 1.0 + sum(
        wob_c[:, h, None, None] * np.cos((h + 2) * th + wob_p[:, h, None, None]) for h in range(3)
    )
    rho_all = np.sqrt((u / a) ** 2 + (v * a) ** 2) / (cells["r"][:, None, None] * wob)
    cell_id = np.argmin(rho_all, axis=0)
    rho = np.take_along_axis(rho_all, cell_id[None], 0)[0]
    theta = np.take_along_axis(th, cell_id[None], 0)[0]
    # second-smallest over K cells: a running pair of minima beats np.partition along axis 0
    first = np.full_like(rho, np.inf)
    rho2 = np.full_like(rho, np.inf)
    for layer in rho_all:
        rho2 = np.minimum(rho2, np.maximum(first, layer))
        first = np.minimum(first, layer)
    return cell_id, rho, rho2, theta


def _nucleus_fields(xx, yy, cells: dict, cell_id, rng: np.random.Generator):
    """The nucleus of the owning cell: (centres x, y, radii, normalised radius, angle)."""
    r, k = cells["r"], len(cells["r"])
    off = r * rng.uniform(0, 0.15, k).astype(_F)
    odir = rng.uniform(0, 2 * np.pi, k).astype(_F)
    ncx, ncy = cells["cx"] + off * np.cos(odir), cells["cy"] + off * np.sin(odir)
    rn = (r * rng.uniform(0.38, 0.48, k)).astype(_F)
    n_aspect = rng.uniform(1.0, 1.25, k).astype(_F)
    n_phi = rng.uniform(0, np.pi, k).astype(_F)
    n_wob = rng.uniform(0, 0.04, k).astype(_F)
    n_wobp = rng.uniform(0, 2 * np.pi, k).astype(_F)
    ndx, ndy = xx - ncx[cell_id], yy - ncy[cell_id]
    c, s = np.cos(n_phi)[cell_id], np.sin(n_phi)[cell_id]
    u, v = ndx * c + ndy * s, -ndx * s + ndy * c
    na = n_aspect[cell_id]
    nth = np.arctan2(v, u)
    nu = np.sqrt((u / na) ** 2 + (v * na) ** 2) / (
        rn[cell_id] * (1.0 + n_wob[cell_id] * np.cos(3 * nth + n_wobp[cell_id]))
    )
    return ncx, ncy, rn, nu, np.arctan2(ndy, ndx)


def _per_cell_properties(rng: np.random.Generator, k: int, r: np.ndarray) -> dict:
    """Per-cell properties that several stains or motifs share."""
    return {
        "expr": np.where(rng.random(k) < 0.12, rng.uniform(0.05, 0.25, k), rng.uniform(0.5, 1, k)),
        "n_fibres": rng.integers(28, 48, k).astype(_F),
        "bend": rng.uniform(-0.4, 0.4, k).astype(_F),
        "actin_dir": rng.uniform(0, np.pi, k).astype(_F),
        "actin_period": (r * rng.uniform(0.16, 0.26, k)).astype(_F),
        "actin_off": rng.uniform(0, 1, k).astype(_F),
        "mtoc_dir": rng.uniform(-np.pi, np.pi, k).astype(_F),
        "blue": rng.uniform(0.45, 1.0, k).astype(_F),
        "red": rng.uniform(0.5, 1.0, k).astype(_F),
        "yellow": rng.uniform(0.5, 1.0, k).astype(_F),
    }


def _nucleoli(rng: np.random.Generator, ncx, ncy, rn, m: int):
    """1-4 nucleoli per interphase nucleus (the blue stain is dimmer there): (y, x, sigma)."""
    ys, xs, sig = [], [], []
    for i in range(len(rn)):
        if i == m:
            continue
        for _ in range(int(rng.integers(1, 5))):
            rad, ang = rn[i] * 0.5 * np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            ys.append(ncy[i] + rad * np.sin(ang))
            xs.append(ncx[i] + rad * np.cos(ang))
            sig.append(max(0.7, float(rn[i]) * rng.uniform(0.1, 0.16)))
    return np.asarray(ys), np.asarray(xs), np.asarray(sig)


def _centrosome_xy(sc: _Scene, k_dist: float = 1.2) -> tuple[np.ndarray, np.ndarray]:
    """Per-cell point just outside the nucleus, on the side the MTOC (and Golgi) face."""
    d = sc.per_cell["mtoc_dir"]
    return sc.ncy + k_dist * sc.rn * np.sin(d), sc.ncx + k_dist * sc.rn * np.cos(d)


# ----------------------------------------------------------------------------------------------
# Shared structures (also drawn in red, blue and yellow)
# ----------------------------------------------------------------------------------------------


def _nucleoli_map(sc: _Scene) -> np.ndarray:
    ys, xs, sig = sc.nucleoli
    return np.clip(_gaussians(sc.size, ys, xs, sig, 1.0), 0.0, 1.0) * sc.nuc_soft


def _fibres(sc: _Scene, rng: np.random.Generator) -> np.ndarray:
    """Microtubules: curved fibres radiating from the cell centre (red; green for label 14)."""
    wobble, vary = _noise(
        rng, sc.size, [(float(sc.r.mean()), False), (float(sc.r.mean()) * 0.3, False)]
    )
    n = sc.g("n_fibres")
    ang = sc.theta + sc.g("bend") * sc.rho + 0.04 * wobble
    spacing = np.maximum(2 * np.pi * sc.rho * sc.r_px / n, 0.5)
    f = _lines(ang * n / (2 * np.pi), spacing, np.maximum(0.55, 0.018 * sc.r_px))
    return f * np.clip(0.6 + 0.4 * vary, 0.0, 1.0) * sc.cell_soft


def _er(sc: _Scene, rng: np.random.Generator) -> np.ndarray:
    """ER: a fine reticular mesh (zero set of band-pass noise), densest round the nucleus."""
    (b,) = _noise(rng, sc.size, [(max(3.0, 0.16 * float(sc.r.mean())), True)])
    mesh = np.exp(-0.5 * (b / 0.45) ** 2)
    near = np.exp(-np.maximum(sc.nu - 1.0, 0.0) / 1.2)
    rim = np.exp(-0.5 * ((sc.nu - 1.0) / 0.08) ** 2) * sc.cell_soft
    return np.maximum(sc.cyto_soft * (0.25 + 0.75 * mesh) * (0.3 + 0.7 * near), 0.6 * rim)


def _spindle(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Mitotic spindle (fibres converging on two poles) and metaphase plate, for the dividing cell."""
    yy, xx = _grid(sc.size)
    i = sc.mitotic
    gamma = rng.uniform(0, np.pi)
    half_len = 0.55 * float(sc.r[i])
    dx, dy = xx - sc.cx[i], yy - sc.cy[i]
    p = (dx * np.cos(gamma) + dy * np.sin(gamma)) / half_len
    q = (-dx * np.sin(gamma) + dy * np.cos(gamma)) / half_len
    h = np.maximum(0.42 * (1.0 - p * p), 1e-3)
    env = _soft((h - np.abs(q)) * half_len, 1.0) * (np.abs(p) < 1.0)
    n_sp = 9.0
    fib = _lines(q / h * (n_sp / 2), 2 * h * half_len / n_sp, max(0.55, 0.02 * float(sc.r[i])))
    poles = _gaussians(
        sc.size,
        [sc.cy[i] + half_len * np.sin(gamma), sc.cy[i] - half_len * np.sin(gamma)],
        [sc.cx[i] + half_len * np.cos(gamma), sc.cx[i] - half_len * np.cos(gamma)],
        max(0.8, 0.05 * float(sc.r[i])),
        1.0,
    )
    spindle = np.clip(env * (0.35 + 0.65 * fib) + poles, 0.0, 1.0)
    plate = np.exp(-0.5 * (p * half_len / max(0.8, 0.07 * float(sc.r[i]))) ** 2)
    plate = plate * _soft(0.55 - np.abs(q), 0.1) * (0.6 + 0.4 * sc.tex)
    return spindle.astype(_F), plate.astype(_F)


def _bridge(sc: _Scene, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Cytokinetic bridge between the two closest cells: (tube, midbody) maps."""
    yy, xx = _grid(sc.size)
    d2 = (sc.cx[:, None] - sc.cx[None]) ** 2 + (sc.cy[:, None] - sc.cy[None]) ** 2
    np.fill_diagonal(d2, np.inf)
    i, j = np.unravel_index(int(np.argmin(d2)), d2.shape)
    dist = float(np.sqrt(d2[i, j]))
    t = float(sc.r[i] / (sc.r[i] + sc.r[j]))
    my, mx = sc.cy[i] + t * (sc.cy[j] - sc.cy[i]), sc.cx[i] + t * (sc.cx[j] - sc.cx[i])
    uy, ux = (sc.cy[j] - sc.cy[i]) / dist, (sc.cx[j] - sc.cx[i]) / dist
    hl = 0.22 * dist * rng.uniform(0.8, 1.2)
    along = np.clip((xx - mx) * ux + (yy - my) * uy, -hl, hl)
    dd = np.sqrt((xx - mx - along * ux) ** 2 + (yy - my - along * uy) ** 2)
    rbar = float(sc.r.mean())
    tube = np.exp(-0.5 * (dd / max(0.6, 0.03 * rbar)) ** 2)
    mid = _gaussians(sc.size, [my], [mx], max(0.8, 0.05 * rbar), 1.0)
    return tube.astype(_F), mid


# ----------------------------------------------------------------------------------------------
# Green motifs: one per label, each peaking near 1 where the protein is
# ----------------------------------------------------------------------------------------------


def _per_cell_points(sc: _Scene, weight: np.ndarray, per_cell: float, rng) -> tuple:
    return _sample_points(weight, int(round(per_cell * sc.n_cells)), rng)


def _m_nucleoplasm(sc, rng, ctx):
    return sc.nuc_soft * (0.7 + 0.3 * sc.tex) * (1.0 - 0.75 * ctx["nucleoli"])


def _m_nuclear_membrane(sc, rng, ctx):
    w = np.maximum(0.06, 0.8 / sc.rn_px)
    return np.exp(-0.5 * ((sc.nu - 1.0) / w) ** 2) * sc.cell_soft * (sc.cell_id != sc.mitotic)


def _m_nucleoli(sc, rng, ctx):
    return ctx["nucleoli"]


def _m_fibrillar_center(sc, rng, ctx):
    ys0, xs0, sig0 = sc.nucleoli
    if len(ys0) == 0:
        return np.zeros((sc.size, sc.size), _F)
    reps = rng.integers(2, 6, len(ys0))
    ys0, xs0, sig0 = np.repeat(ys0, reps), np.repeat(xs0, reps), np.repeat(sig0, reps)
    ang, rad = rng.uniform(0, 2 * np.pi, len(ys0)), 0.9 * sig0 * np.sqrt(rng.random(len(ys0)))
    ys, xs = ys0 + rad * np.sin(ang), xs0 + rad * np.cos(ang)
    return np.clip(_gaussians(sc.size, ys, xs, np.maximum(0.55, 0.3 * sig0), 1.0), 0, 1)


def _m_speckles(sc, rng, ctx):
    (b,) = _noise(rng, sc.size, [(max(3.0, 0.4 * float(sc.rn.mean())), True)])
    speck = np.clip((b - 0.5) / 1.2, 0.0, 1.0) ** 0.7
    return sc.nuc_soft * (0.12 + 0.88 * speck) * (1.0 - ctx["nucleoli"])


def _m_nuclear_bodies(sc, rng, ctx):
    weight = (sc.nu < 0.8) * sc.nuc_soft * (ctx["nucleoli"] < 0.2)
    ys, xs = _per_cell_points(sc, weight, rng.uniform(2, 6), rng)
    sig = max(0.7, 0.09 * float(sc.rn.mean()))
    return np.clip(_gaussians(sc.size, ys, xs, sig, rng.uniform(0.7, 1.0, len(ys))), 0, 1)


def _m_er(sc, rng, ctx):
    return ctx["er"]


def _m_golgi(sc, rng, ctx):
    facing = np.cos(sc.alpha - sc.g("mtoc_dir"))  # 1 on the MTOC side of the nucleus
    region = np.exp(-0.5 * ((sc.nu - 1.3) / 0.22) ** 2) * np.exp(2.5 * (facing - 1.0))
    (b,) = _noise(rng, sc.size, [(max(3.0, 0.12 * float(sc.r.mean())), True)])
    return region * sc.cyto_soft * np.clip(0.45 + 0.4 * b, 0.0, 1.0) * 1.6


def _dots(sc, rng, weight, per_cell, sigma_frac, min_sigma, amp=(0.5, 1.0)):
    ys, xs = _per_cell_points(sc, weight, per_cell, rng)
    sig = max(min_sigma, sigma_frac * float(sc.r.mean()))
    return np.clip(_gaussians(sc.size, ys, xs, sig, rng.uniform(*amp, len(ys))), 0, 1)


def _m_peroxisomes(sc, rng, ctx):
    return _dots(sc, rng, sc.cyto_soft, rng.uniform(30, 50), 0.02, 0.55)


def _m_endosomes(sc, rng, ctx):
    w = sc.cyto_soft * np.exp(-np.maximum(sc.nu - 1.0, 0.0) / 0.8)
    return _dots(sc, rng, w, rng.uniform(15, 25), 0.035, 0.7, (0.4, 1.0))


def _m_lysosomes(sc, rng, ctx):
    w = sc.cyto_soft * np.exp(-np.maximum(sc.nu - 1.0, 0.0) / 0.4)
    return _dots(sc, rng, w, rng.uniform(6, 12), 0.055, 0.9, (0.6, 1.0))


def _m_intermediate_filaments(sc, rng, ctx):
    wob, vary = _noise(
        rng, sc.size, [(0.8 * float(sc.r.mean()), False), (0.3 * float(sc.r.mean()), False)]
    )
    k = 2.2
    f = _lines(k * sc.nu + 0.7 * wob, sc.rn_px / k, np.maximum(0.6, 0.025 * sc.r_px))
    cage = 0.6 + 0.4 * np.exp(-np.maximum(sc.nu - 1.0, 0.0) / 1.5)
    return f * cage * sc.cyto_soft * np.clip(0.65 + 0.35 * vary, 0.0, 1.0)


def _actin_phase(sc: _Scene) -> np.ndarray:
    yy, xx = _grid(sc.size)
    b = sc.g("actin_dir")
    return (xx * np.cos(b) + yy * np.sin(b)) / sc.g("actin_period") + sc.g("actin_off")


def _m_actin(sc, rng, ctx):
    (vary,) = _noise(rng, sc.size, [(0.5 * float(sc.r.mean()), False)])
    f = _lines(_actin_phase(sc), sc.g("actin_period"), np.maximum(0.6, 0.025 * sc.r_px))
    cortex = 0.5 * np.exp(-0.5 * ((sc.rho - 0.95) / 0.04) ** 2)
    return np.maximum(f * np.clip(0.6 + 0.4 * vary, 0, 1) * _soft(0.97 - sc.rho, 0.05), cortex) * (
        sc.cell_soft
    )


def _m_focal_adhesions(sc, rng, ctx):
    (dash,) = _noise(rng, sc.size, [(max(3.0, 0.15 * float(sc.r.mean())), True)])
    f = _lines(_actin_phase(sc), sc.g("actin_period"), np.maximum(0.8, 0.04 * sc.r_px))
    ends = np.abs(np.cos(sc.alpha - sc.g("actin_dir"))) ** 3
    ring = np.exp(-0.5 * ((sc.rho - 0.86) / 0.07) ** 2)
    return f * ring * ends * (dash > -0.2) * sc.cell_soft


def _m_microtubules(sc, rng, ctx):
    return ctx["fibres"]


def _m_microtubule_ends(sc, rng, ctx):
    (dash,) = _noise(rng, sc.size, [(max(3.0, 0.12 * float(sc.r.mean())), True)])
    ring = np.exp(-0.5 * ((sc.rho - 0.9) / 0.05) ** 2)
    return np.clip(ctx["fibres"] * ring * (dash > 0.0) * 1.5, 0, 1)


def _m_bridge(sc, rng, ctx):
    tube, mid = ctx["bridge"]
    return np.clip(0.5 * tube + mid, 0, 1)


def _m_spindle(sc, rng, ctx):
    return ctx["spindle"][0]


def _m_mtoc(sc, rng, ctx):
    ys, xs = _centrosome_xy(sc, 1.15)
    rbar = float(sc.r.mean())
    core = _gaussians(sc.size, ys, xs, max(1.0, 0.07 * rbar), 1.0)
    halo = _gaussians(sc.size, ys, xs, 0.25 * rbar, 0.25)
    return np.clip(core + halo, 0, 1)


def _m_centrosome(sc, rng, ctx):
    ys, xs = _centrosome_xy(sc, 1.15)
    two = rng.random(len(ys)) < 0.5
    ang = rng.uniform(0, 2 * np.pi, len(ys))
    sep = 0.09 * sc.r
    ys = np.concatenate([ys, (ys + sep * np.sin(ang))[two]])
    xs = np.concatenate([xs, (xs + sep * np.cos(ang))[two]])
    return np.clip(_gaussians(sc.size, ys, xs, max(0.6, 0.03 * float(sc.r.mean())), 1.0), 0, 1)


def _m_lipid_droplets(sc, rng, ctx):
    ys, xs = _per_cell_points(sc, sc.cyto_soft * (sc.rho < 0.85), rng.uniform(3, 8), rng)
    rbar = float(sc.r.mean())
    rad = np.maximum(1.6, rbar * rng.uniform(0.06, 0.11, len(ys))).astype(_F)[:, None, None]
    w = np.maximum(0.5, 0.25 * rad)
    half = int(np.ceil(float((rad + 3 * w).max()))) if len(ys) else 0

    def ring(dy, dx):
        return np.exp(-0.5 * ((np.sqrt(dy * dy + dx * dx) - rad) / w) ** 2)

    return np.clip(_stamp(sc.size, ys, xs, half, ring), 0, 1)


def _m_aggresome(sc, rng, ctx):
    ys, xs = _centrosome_xy(sc, 1.35)
    keep = rng.random(len(ys)) < 0.75
    keep[rng.integers(len(ys))] = True
    ys, xs = np.repeat(ys[keep], 4), np.repeat(xs[keep], 4)
    rbar = float(sc.r.mean())
    jitter = rng.normal(0, 0.07 * rbar, (2, len(ys)))
    sig = rbar * rng.uniform(0.05, 0.1, len(ys))
    return np.clip(_gaussians(sc.size, ys + jitter[0], xs + jitter[1], sig, 0.8), 0, 1)


def _m_cytosol(sc, rng, ctx):
    near = 0.75 + 0.25 * np.exp(-np.maximum(sc.nu - 1.0, 0.0) / 1.5)
    return sc.cyto_soft * near * (0.7 + 0.3 * sc.tex)


def _m_cytoplasmic_bodies(sc, rng, ctx):
    return _dots(sc, rng, sc.cyto_soft * (sc.rho < 0.85), rng.uniform(1, 3), 0.06, 0.9, (0.8, 1.0))


def _m_plasma_membrane(sc, rng, ctx):
    w = np.maximum(0.6, 0.025 * sc.r_px) / sc.r_px
    return np.exp(-0.5 * ((sc.rho - 0.97) / w) ** 2) * (sc.rho < 1.05)


def _m_cell_junctions(sc, rng, ctx):
    (puncta,) = _noise(rng, sc.size, [(max(3.0, 0.2 * float(sc.r.mean())), True)])
    # pixel distance to the shared boundary is about (rho2 - rho) * r / 2
    d = (sc.rho2 - sc.rho) * sc.r_px * 0.5
    w = np.maximum(0.7, 0.03 * sc.r_px)
    junction = np.exp(-0.5 * (d / w) ** 2) * (sc.rho < 1.02) * (sc.rho2 < 1.1)
    return junction * np.clip(0.55 + 0.45 * puncta, 0.0, 1.0)


def _m_mitochondria(sc, rng, ctx):
    rbar = float(sc.r.mean())
    b, seg = _noise(rng, sc.size, [(max(5.0, 0.28 * rbar), True), (max(3.0, 0.22 * rbar), False)])
    worms = np.exp(-0.5 * (b / 0.35) ** 2) * (seg > 0.1)
    near = 0.4 + 0.6 * np.exp(-np.maximum(sc.nu - 1.0, 0.0) / 1.0)
    return worms * near * sc.cyto_soft


def _m_rods_rings(sc, rng, ctx):
    ys, xs = _per_cell_points(sc, sc.cyto_soft * (sc.rho < 0.85), rng.uniform(2, 5), rng)
    p = len(ys)
    rbar = float(sc.r.mean())
    is_rod = (rng.random(p) < 0.6)[:, None, None]
    length = max(2.0, 0.28 * rbar)
    rad = max(1.5, 0.09 * rbar)
    w = max(0.55, 0.03 * rbar)
    ang = rng.uniform(0, np.pi, p).astype(_F)[:, None, None]
    half = int(np.ceil(max(length / 2, rad) + 3 * w))

    def rod_or_ring(dy, dx):
        along = np.clip(dx * np.cos(ang) + dy * np.sin(ang), -length / 2, length / 2)
        d_rod = np.sqrt((dx - along * np.cos(ang)) ** 2 + (dy - along * np.sin(ang)) ** 2)
        d_ring = np.abs(np.sqrt(dx * dx + dy * dy) - rad)
        return np.exp(-0.5 * (np.where(is_rod, d_rod, d_ring) / w) ** 2)

    return np.clip(_stamp(sc.size, ys, xs, half, rod_or_ring), 0, 1)


# label index -> motif(scene, rng, shared) -> [S, S] map peaking near 1 where the protein is
_MOTIFS: dict[int, Callable] = {
    0: _m_nucleoplasm,  # fills the nucleus, spares the nucleoli
    1: _m_nuclear_membrane,  # thin ring round the nucleus
    2: _m_nucleoli,  # 1-4 blobs inside the nucleus
    3: _m_fibrillar_center,  # clusters of tiny dots inside the nucleoli
    4: _m_speckles,  # irregular speckles over the nucleoplasm
    5: _m_nuclear_bodies,  # 2-6 distinct round dots in the nucleus
    6: _m_er,  # green copy of the yellow ER mesh
    7: _m_golgi,  # perinuclear cap on the MTOC side
    8: _m_peroxisomes,  # many tiny dots all over the cytoplasm
    9: _m_endosomes,  # small dots, denser near the nucleus
    10: _m_lysosomes,  # larger dots clustered round the nucleus
    11: _m_intermediate_filaments,  # wavy filaments caging the nucleus
    12: _m_actin,  # straight parallel bundles across the cell, cortical rim
    13: _m_focal_adhesions,  # short dashes at the fibre ends near the cell edge
    14: _m_microtubules,  # green copy of the red fibres
    15: _m_microtubule_ends,  # dots at the fibre tips near the cell edge
    16: _m_bridge,  # tube and midbody between two daughter cells
    17: _m_spindle,  # bipolar spindle in the dividing cell
    18: _m_mtoc,  # one bright dot with a halo beside the nucleus
    19: _m_centrosome,  # 1-2 tight dots beside the nucleus
    20: _m_lipid_droplets,  # hollow rings in the cytoplasm
    21: _m_plasma_membrane,  # ring at every cell's edge
    22: _m_cell_junctions,  # only where two cells touch, punctate
    23: _m_mitochondria,  # short worm-like strands, denser near the nucleus
    24: _m_aggresome,  # one large irregular juxtanuclear blob
    25: _m_cytosol,  # diffuse cytoplasm fill, nucleus excluded
    26: _m_cytoplasmic_bodies,  # 1-3 big distinct dots per cell
    27: _m_rods_rings,  # small rods and rings in the cytoplasm
}
assert sorted(_MOTIFS) == list(range(NUM_LABELS))

# Per-stain gains chosen so that the channel means land near the Kaggle train set's
# (R, G, B, Y about 0.08, 0.05, 0.055, 0.08 on a 0-1 scale; see shared/reference/hpa.md).
_STAIN_GAIN = np.asarray([0.58, 0.55, 0.83, 0.63], dtype=_F)
_P_MITOTIC_UNLABELLED = 0.12  # dividing cells and bridges also show up without their labels,
_P_BRIDGE_UNLABELLED = 0.06  # in red: the model has to read the green stain, not the red one


def render_sample(labels: Sequence[int], size: int, rng: np.random.Generator) -> np.ndarray:
    """One synthetic sample with the given labels: uint8 ``[size, size, 4]`` in R, G, B, Y order.

    ``labels`` may be empty (no protein-specific green, only background). ``rng`` is consumed;
    the same labels, size and generator state always give the same pixels.
    """
    labels = sorted({int(x) for x in labels})
    if any(not 0 <= x < NUM_LABELS for x in labels):
        raise ValueError(f"labels must be in 0..{NUM_LABELS - 1}, got {labels}")
    if size < MIN_SIZE:
        raise ValueError(f"size must be >= {MIN_SIZE}, got {size}")
    has = set(labels)
    mitotic = 17 in has or rng.random() < _P_MITOTIC_UNLABELLED
    bridge = 16 in has or rng.random() < _P_BRIDGE_UNLABELLED
    sc = _make_scene(size, rng, mitotic)

    ctx: dict[str, object] = {"nucleoli": _nucleoli_map(sc), "fibres": _fibres(sc, rng)}
    ctx["er"] = _er(sc, rng)
    if sc.mitotic >= 0:
        ctx["spindle"] = _spindle(sc, rng)
    if bridge:
        ctx["bridge"] = _bridge(sc, rng)

    # red: microtubules, dimmer over the nucleus; spindle and bridge where there are some
    red = sc.g("red") * sc.cell_soft * (0.2 + 0.8 * ctx["fibres"]) * (1.0 - 0.55 * sc.nuc_soft)
    blue = sc.g("blue") * sc.nuc_soft * (0.65 + 0.35 * sc.tex) * (1.0 - 0.45 * ctx["nucleoli"])
    yellow = sc.g("yellow") * ctx["er"]
    if "spindle" in ctx:
        spindle, plate = ctx["spindle"]
        red = np.maximum(red, spindle)
        blue = np.maximum(blue, 1.2 * plate)
    if "bridge" in ctx:
        tube, mid = ctx["bridge"]
        red = np.maximum(red, tube * (1.0 - 0.8 * np.clip(2.0 * mid, 0.0, 1.0)))

    # green: faint non-specific haze, plus each label's motif at its own strength
    green = (0.04 + 0.03 * sc.tex) * sc.cell_soft
    for lab in labels:
        green = green + rng.uniform(0.55, 1.0) * _MOTIFS[lab](sc, rng, ctx)
    expr = sc.g("expr")
    if 16 in has:
        expr = np.maximum(expr, ctx["bridge"][0])  # the bridge lies across two cells' borders
    green = green * expr

    # optics and camera: blur, per-stain exposure, background, shot and read noise
    img = np.stack([red, green, blue, yellow], axis=-1).astype(_F)
    img = _blur(img, max(0.45, 0.5 * size / 256))
    img *= _STAIN_GAIN * rng.lognormal(0.0, 0.3, 4).astype(_F)
    img += rng.uniform(0.0, 0.015, 4).astype(_F)
    read = rng.uniform(0.004, 0.015)
    sd = np.sqrt(0.003 * np.maximum(img, 0.0) + read * read)
    img += sd * rng.standard_normal(img.shape, dtype=_F)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)


# ----------------------------------------------------------------------------------------------
# Writing the dataset
# ----------------------------------------------------------------------------------------------


def _png_bytes(plane: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    # compress_level 1: PNG is lossless at any level, and 1 is several times faster to write
    Image.fromarray(np.ascontiguousarray(plane)).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _write_sample(folder: Path, sample_id: str, image: np.ndarray) -> None:
    for c, stain in enumerate(CHANNELS):
        path = folder / f"{sample_id}_{stain}.png"
        tmp = folder / f".{sample_id}_{stain}.png.tmp"
        tmp.write_bytes(_png_bytes(image[..., c]))
        os.replace(tmp, path)  # a reader never sees half a PNG (no fsync: the CSV is the commit)


def _render_chunk(job: tuple) -> int:
    """Worker: render and write samples ``[start, start + len(ids))`` of one split."""
    folder, split, start, ids, labels, size, seed = job
    folder = Path(folder)
    for offset, (sample_id, labs) in enumerate(zip(ids, labels)):
        image = render_sample(labs, size, sample_rng(seed, split, start + offset))
        _write_sample(folder, sample_id, image)
    return len(ids)


def _targets_csv(header: str, ids: Sequence[str], labels: Sequence[Sequence[int]]) -> str:
    rows = [f"{i},{' '.join(str(x) for x in labs)}" for i, labs in zip(ids, labels)]
    return header + "\n" + "".join(r + "\n" for r in rows)


@dataclass(frozen=True)
class SynthSummary:
    """What :func:`generate` wrote."""

    out: Path
    n_train: int
    n_test: int
    size: int
    seed: int
    workers: int
    seconds: float
    label_counts: tuple[int, ...]  # per label, train split

    @property
    def files(self) -> int:
        return 4 * (self.n_train + self.n_test) + 1 + (2 if self.n_test else 0)

    def line(self) -> str:
        rare = min(self.label_counts)
        return (
            f"wrote {self.n_train} train + {self.n_test} test samples ({self.size} px, seed "
            f"{self.seed}, rarest label x{rare}) to {self.out} in {self.seconds:.1f} s "
            f"with {self.workers} worker(s)"
        )


def _check_args(
    out: Path, n: int, size: int, test_n: int, seed: int, workers: int, overwrite: bool
):
    if n < 1:
        raise UserError(f"--n must be at least 1 (got {n}).")
    if size < MIN_SIZE:
        raise UserError(f"--size must be at least {MIN_SIZE} pixels (got {size}).")
    if test_n < 0:
        raise UserError(f"--test-n must be 0 or more (got {test_n}).")
    if seed < 0:
        raise UserError(f"--seed must be 0 or more (got {seed}).")
    if workers < 0:
        raise UserError(f"--workers must be 0 (one per CPU core) or more (got {workers}).")
    if out.exists() and not out.is_dir():
        raise UserError(f"output path {out} exists and is not a folder.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(
            f"output folder {out} is not empty; pass --overwrite to replace the dataset in it."
        )


def _clear_previous(out: Path) -> None:
    """Remove a previous dataset's CSVs first (they mark it complete), then its stain PNGs."""
    for name in _OUR_CSVS:
        (out / name).unlink(missing_ok=True)
    for split in SPLITS:
        folder = out / split
        if folder.is_dir():
            for p in folder.iterdir():
                if _PNG_NAME.match(p.name) or (p.name.startswith(".") and p.name.endswith(".tmp")):
                    p.unlink()


def generate(
    out: str | os.PathLike,
    n: int,
    size: int = 512,
    test_n: int = 0,
    seed: int = 0,
    workers: int = 1,
    *,
    overwrite: bool = False,
    progress: bool = False,
) -> SynthSummary:
    """Write a synthetic dataset in the Kaggle layout to ``out`` and return what was written.

    ``generate("data/synth", n=2000, size=128, test_n=500, seed=0, workers=2)``. ``workers=0``
    uses one process per CPU core; the files are byte-identical for any ``workers``. The CSVs
    are written last and atomically, so a ``train.csv`` on disk means its images are complete.
    Raises :class:`UserError` for bad arguments or a non-empty ``out`` without ``overwrite``.
    """
    out = Path(out)
    _check_args(out, n, size, test_n, seed, workers, overwrite)
    workers = workers or (os.cpu_count() or 1)
    t0 = time.perf_counter()
    if out.is_dir():
        _clear_previous(out)

    ids = make_ids(n + test_n, np.random.default_rng([seed, _STREAM_IDS]))
    splits = {"train": sorted(ids[:n])}
    if test_n:
        splits["test"] = sorted(ids[n:])
    labels = {
        s: sample_labels(len(v), np.random.default_rng([seed, _STREAM_LABELS, SPLITS.index(s)]))
        for s, v in splits.items()
    }

    jobs = []
    chunk = max(1, min(32, (n + test_n) // (8 * workers)))
    for s, split_ids in splits.items():
        make_dir(out / s, "OUT")
        for a in range(0, len(split_ids), chunk):
            jobs.append(
                (str(out / s), s, a, split_ids[a : a + chunk], labels[s][a : a + chunk], size, seed)
            )
    _run_jobs(jobs, workers, n + test_n, progress)

    # CSVs last: their presence says the images are all there
    if test_n:
        test_ids = splits["test"]
        atomic_write_text(
            out / "test_labels.csv", _targets_csv("Id,Target", test_ids, labels["test"])
        )
        atomic_write_text(
            out / "sample_submission.csv", _targets_csv("Id,Predicted", test_ids, [[0]] * test_n)
        )
    atomic_write_text(
        out / "train.csv", _targets_csv("Id,Target", splits["train"], labels["train"])
    )

    counts = np.zeros(NUM_LABELS, dtype=np.int64)
    for labs in labels["train"]:
        counts[list(labs)] += 1
    return SynthSummary(
        out=out,
        n_train=n,
        n_test=test_n,
        size=size,
        seed=seed,
        workers=workers,
        seconds=time.perf_counter() - t0,
        label_counts=tuple(int(c) for c in counts),
    )


def _run_jobs(jobs: list[tuple], workers: int, total: int, progress: bool) -> None:
    from contextlib import nullcontext

    bar = None
    if progress:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeRemainingColumn

        bar = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeRemainingColumn(),
        )
    with bar if bar is not None else nullcontext():
        task = bar.add_task("synth", total=total) if bar is not None else None
        if workers == 1:
            done_iter = map(_render_chunk, jobs)
            pool = None
        else:
            import multiprocessing as mp

            # spawn, not fork: the parent may hold threads (torch, pytest) that fork can deadlock
            pool = mp.get_context("spawn").Pool(min(workers, len(jobs)))
            done_iter = pool.imap_unordered(_render_chunk, jobs)
        try:
            for done in done_iter:
                if bar is not None:
                    bar.advance(task, done)
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def configure_parser(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out", metavar="OUT", help="output folder (Kaggle layout is written here)")
    parser.add_argument("--n", type=int, required=True, help="number of training samples")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels (Kaggle: 512)")
    parser.add_argument(
        "--test-n",
        type=int,
        default=0,
        help="number of test samples (adds test/, sample_submission.csv, test_labels.csv)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed: same seed, same bytes")
    parser.add_argument(
        "--workers",
        type=int,
        default=0,
        help="worker processes (0: one per CPU core); the output does not depend on it",
    )
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="allow a non-empty OUT: replace its train.csv, test files and stain PNGs",
    )


def run(args: argparse.Namespace) -> int:
    summary = generate(
        args.out,
        n=args.n,
        size=args.size,
        test_n=args.test_n,
        seed=args.seed,
        workers=args.workers,
        overwrite=args.overwrite,
        progress=True,
    )
    print(summary.line())
    return 0
