"""Test-time augmentation: views of a normalised NCHW batch, applied on the device.

``none``; ``flips`` = identity, horizontal, vertical and both flips; ``dihedral`` = the 8 views
of the dihedral group (a transposition or not, times the 4 flip combinations, which is the same
set as rot90 by 0-3 with and without a flip)::

    views = resolve_views("dihedral")
    rot90 = View("rot90", transpose=True, vflip=True)      # == torch.rot90(x, 1, dims=(-2, -1))
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from fasthpa.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class View:
    """One test-time view of an NCHW batch: an optional H/W transposition, then flips.

    ``View("rot90", transpose=True, vflip=True)(x)`` equals ``torch.rot90(x, 1, dims=(-2, -1))``.
    """

    name: str
    transpose: bool = False
    hflip: bool = False
    vflip: bool = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.transpose:
            x = x.transpose(-2, -1)
        if self.hflip:
            x = x.flip(-1)
        if self.vflip:
            x = x.flip(-2)
        return x


IDENTITY = View("identity")
FLIP_VIEWS = (
    IDENTITY,
    View("hflip", hflip=True),
    View("vflip", vflip=True),
    View("rot180", hflip=True, vflip=True),
)
DIHEDRAL_VIEWS = FLIP_VIEWS + (
    View("transpose", transpose=True),
    View("rot270", transpose=True, hflip=True),
    View("rot90", transpose=True, vflip=True),
    View("antitranspose", transpose=True, hflip=True, vflip=True),
)
TTA_VIEWS: dict[str, tuple[View, ...]] = {
    "none": (IDENTITY,),
    "flips": FLIP_VIEWS,
    "dihedral": DIHEDRAL_VIEWS,
}


def resolve_views(tta: str | Sequence[View]) -> tuple[View, ...]:
    """``tta`` as a tuple of views: a name from TTA_VIEWS, or the views themselves (tests)."""
    if isinstance(tta, str):
        if tta not in TTA_VIEWS:
            raise UserError(f"--tta {tta!r} is not one of {', '.join(TTA_VIEWS)}.")
        return TTA_VIEWS[tta]
    views = tuple(tta)
    if not views or not all(isinstance(v, View) for v in views):
        raise ValueError("tta must be a name or a non-empty sequence of View objects")
    return views
