"""Which dataset rows each rank reads, batch by batch, and the random augmentation draws.

One rule, shared by every loader backend so they agree sample for sample:

- **train**: a global permutation of ``indices`` seeded by ``(seed, epoch)`` (the same on every
  rank), cut into global batches of ``world_size * batch_size`` rows (the tail that does not fill
  one is dropped); rank ``r`` takes the ``r``-th contiguous chunk of each global batch. Every rank
  yields the same number of equal-sized batches (static shapes for compiled graphs; no DDP hang
  on a short rank), and global batch ``s`` holds the same rows in the same order whatever the
  world size: ``W`` ranks at batch ``B`` see exactly what one process sees with ``W`` accumulated
  micro-batches of ``B`` (the trainer's test of DDP against one process relies on it).
- **eval**: ``indices`` in their given order, dealt round-robin to the ranks, each rank padded
  with ``-1`` to the same number of full batches. Every real row appears exactly once over all
  ranks; the ``-1`` entries are padding that the evaluator masks out by index.

Augmentation draws (flips, transposition, crop offsets) come from a generator seeded by
``(seed, epoch, step * world_size + rank)`` -- the micro-batch's position in the epoch, not the
rank -- so a resumed run replays them, every backend draws the same, and the draws of a micro-batch
do not depend on how many ranks share the epoch.

Call::

    plan = epoch_plan(indices, train=True, batch_size=64, rank=0, world_size=2, seed=0, epoch=3)
    plan.shape            # [batches, batch_size] int64 rows, -1 = padding (eval only)
    draw = augment_draws(64, seed=0, epoch=3, rank=0, step=0, ...)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from fasthpa.errors import UserError

# Distinct stream tags keep the permutation and the augmentation draws independent.
_PERMUTATION_STREAM = 0x5EED
_AUGMENT_STREAM = 0xA06
_REPEAT_STREAM = 0x4E9


def num_batches(n: int, *, train: bool, batch_size: int, world_size: int) -> int:
    """Batches each rank yields per epoch for ``n`` rows (the same on every rank)."""
    if batch_size < 1:
        raise UserError(f"--batch-size {batch_size}: must be at least 1.")
    if world_size < 1:
        raise UserError(f"world size {world_size}: must be at least 1.")
    if train:
        return (n // world_size) // batch_size
    per_rank = -(-n // world_size)
    return -(-per_rank // batch_size)


def epoch_plan(
    indices: np.ndarray,
    *,
    train: bool,
    batch_size: int,
    rank: int = 0,
    world_size: int = 1,
    seed: int = 0,
    epoch: int = 0,
    repeat: np.ndarray | None = None,
) -> np.ndarray:
    """The rows this rank reads in ``epoch``: int64 [batches, batch_size], ``-1`` = padding.

    See the module docstring for the rule. ``repeat`` (train only; float >= 1 per index) is
    label-aware sampling: index i enters the epoch's pool floor(r_i) times, once more with
    probability frac(r_i) (seeded by (seed, epoch)), and the shuffled pool is cut to the
    epoch's usual length, so rare images come round more often at the same cost per epoch.
    Raises UserError when training would yield no batch.
    """
    indices = np.asarray(indices, dtype=np.int64).reshape(-1)
    if not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is outside 0-{world_size - 1}.")
    n = len(indices)
    nb = num_batches(n, train=train, batch_size=batch_size, world_size=world_size)
    if train:
        if nb == 0:
            raise UserError(
                f"--batch-size {batch_size}: the {n} training rows give no full batch on each of "
                f"{world_size} rank(s); lower --batch-size."
            )
        pool = indices if repeat is None else _repeated(indices, repeat, seed, epoch)
        rng = np.random.default_rng([seed, epoch, _PERMUTATION_STREAM])
        perm = pool[rng.permutation(len(pool))][: nb * world_size * batch_size]
        return perm.reshape(nb, world_size, batch_size)[:, rank, :].copy()
    mine = indices[rank::world_size]
    out = np.full(nb * batch_size, -1, dtype=np.int64)
    out[: len(mine)] = mine
    return out.reshape(nb, batch_size)


def _repeated(indices: np.ndarray, repeat: np.ndarray, seed: int, epoch: int) -> np.ndarray:
    repeat = np.asarray(repeat, dtype=np.float64).reshape(-1)
    assert repeat.shape == indices.shape and (repeat >= 1).all(), "one repeat factor >= 1 per row"
    whole = np.floor(repeat)
    extra = np.random.default_rng([seed, epoch, _REPEAT_STREAM]).random(len(repeat))
    return np.repeat(indices, (whole + (extra < repeat - whole)).astype(np.int64))


def repeat_factors(targets: np.ndarray, below: float, power: float = 0.5) -> np.ndarray:
    """Label-aware sampling factors for the rows of ``targets`` (uint8 [N, L]): a row holding a
    label of training frequency f < ``below`` repeats max((below / f) ** power) times (the
    repeat-factor sampling of Gupta et al. 2019, LVIS, with the square root by default), others
    once. ``below`` 0 turns it off (all ones)."""
    targets = np.asarray(targets)
    factors = np.ones(len(targets))
    if below <= 0 or len(targets) == 0:
        return factors
    freq = targets.mean(axis=0)
    per_label = np.where(
        (freq > 0) & (freq < below), (below / np.maximum(freq, 1e-12)) ** power, 1.0
    )
    held = targets.astype(bool)
    return np.maximum(factors, np.where(held, per_label[None, :], 1.0).max(axis=1, initial=1.0))


@dataclass(frozen=True)
class AugmentDraws:
    """Per-sample augmentation decisions for one batch (numpy arrays of length B).

    ``transpose`` swaps H and W (with the flips it gives the 8 dihedral views);
    ``crop_y``/``crop_x`` are the top-left corner of the crop window (0 when no crop).
    """

    hflip: np.ndarray
    vflip: np.ndarray
    transpose: np.ndarray
    crop_y: np.ndarray
    crop_x: np.ndarray

    def as_array(self) -> np.ndarray:
        """int32 [B, 5]: hflip, vflip, transpose, crop_y, crop_x (the layout DALI is fed)."""
        return np.stack(
            [self.hflip, self.vflip, self.transpose, self.crop_y, self.crop_x], axis=1
        ).astype(np.int32)


def augment_draws(
    batch_size: int,
    *,
    seed: int,
    epoch: int,
    rank: int,
    step: int,
    train: bool,
    world_size: int = 1,
    hflip_p: float = 0.0,
    vflip_p: float = 0.0,
    transpose_p: float = 0.0,
    image_size: int = 0,
    crop: int | None = None,
) -> AugmentDraws:
    """Draw one batch's augmentation decisions, seeded by ``(seed, epoch, step * world_size + rank)``.

    Eval (``train=False``) draws nothing: no flips, and a centred crop when ``crop`` is set.
    ``image_size`` is the side of the image the crop is taken from.
    """
    zeros = np.zeros(batch_size, dtype=np.int32)
    if crop is not None and crop > image_size:
        raise UserError(f"--random-crop {crop} is larger than the image size {image_size}.")
    if not train:
        c = 0 if crop is None else (image_size - crop) // 2
        centre = np.full(batch_size, c, dtype=np.int32)
        return AugmentDraws(zeros, zeros, zeros, centre, centre.copy())
    rng = np.random.default_rng([seed, epoch, step * world_size + rank, _AUGMENT_STREAM])
    # always draw every stream, so turning one augmentation on does not shift the others
    u = rng.random((3, batch_size))
    if crop is None:
        ys = xs = zeros
        rng.integers(0, 1, size=(2, batch_size))
    else:
        ys, xs = rng.integers(0, image_size - crop + 1, size=(2, batch_size), dtype=np.int32)
    return AugmentDraws(
        hflip=(u[0] < hflip_p).astype(np.int32),
        vflip=(u[1] < vflip_p).astype(np.int32),
        transpose=(u[2] < transpose_p).astype(np.int32),
        crop_y=np.asarray(ys, dtype=np.int32),
        crop_x=np.asarray(xs, dtype=np.int32),
    )
