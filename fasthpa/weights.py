"""Fetch or list the torchvision ImageNet checkpoints that `--pretrained imagenet` loads.

On a machine with network access (a cluster's login node), fill the cache once:

    fasthpa weights fetch --arch resnet18 densenet121    # or: --arch all
    fasthpa weights list                                 # what is cached: size, sha256 check

The cache is torchvision's own: ``$TORCH_HOME/hub/checkpoints`` (``torch.hub.get_dir()``, by default
``~/.cache/torch/hub/checkpoints``), so a file torchvision downloaded earlier is reused and a
compute node that shares that folder needs no network. The file names are torchvision's
(``resnet18-f37072fd.pth``) and embed the first hex digits of the file's sha256.

In Python (the trainer calls these through ``fasthpa.model.build_model``):

    path = resolve_pretrained("imagenet", "resnet18")   # cached file, downloaded if missing
    spec = default_pretrained("resnet18")                # "imagenet" if cached, else "none"
    path = resolve_pretrained_distributed(spec, arch)    # under DDP: rank 0 resolves, all load it

Only the weights come from ImageNet: the ImageNet mean/std normalisation does not fit
fluorescence images, so inputs are normalised with the training split's per-channel statistics.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import os
import re
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fasthpa.errors import UserError

# The architectures fasthpa builds; each has a torchvision ImageNet checkpoint.
ARCHS: tuple[str, ...] = ("resnet18", "resnet34", "resnet50", "densenet121")

# torch.hub's rule for the sha256 prefix in a checkpoint's file name (torch.hub.HASH_REGEX).
_HASH_IN_NAME = re.compile(r"-([a-f0-9]*)\.")

# urlopen in torch.hub has no timeout: a firewalled compute node that drops packets would hang
# the whole job (and, under DDP, every rank waiting on rank 0) instead of failing with a message.
DOWNLOAD_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class ImagenetCheckpoint:
    """Where torchvision publishes and caches the ImageNet weights of one architecture."""

    arch: str
    weights: str  # the torchvision enum member, e.g. "ResNet18_Weights.IMAGENET1K_V1"
    url: str
    file_size_mb: float | None  # as torchvision records it (meta["_file_size"], MB)

    @property
    def file_name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    @property
    def hash_prefix(self) -> str | None:
        return hash_in_name(self.file_name)

    @property
    def path(self) -> Path:
        """The cached file's path under the current TORCH_HOME (read at call time)."""
        return cache_dir() / self.file_name


def check_arch(arch: str) -> str:
    """Return ``arch`` if fasthpa builds it, else raise a UserError naming ``--arch``."""
    if arch not in ARCHS:
        raise UserError(f"--arch: unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}.")
    return arch


def cache_dir() -> Path:
    """torchvision's checkpoint cache: ``torch.hub.get_dir()/checkpoints`` (honours TORCH_HOME)."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def imagenet_checkpoint(arch: str) -> ImagenetCheckpoint:
    """The torchvision ImageNet checkpoint for ``arch`` (its weights enum's DEFAULT member).

    DEFAULT is torchvision's recommended ImageNet checkpoint: IMAGENET1K_V1 for resnet18/34 and
    densenet121 (the reference recipe's ResNet18), IMAGENET1K_V2 for resnet50.
    """
    from torchvision.models import get_model_weights

    check_arch(arch)
    weights = get_model_weights(arch).DEFAULT
    return ImagenetCheckpoint(
        arch=arch,
        weights=f"{type(weights).__name__}.{weights.name}",
        url=weights.url,
        file_size_mb=weights.meta.get("_file_size"),
    )


def hash_in_name(file_name: str) -> str | None:
    """The sha256 prefix that a torchvision-style name embeds (``resnet18-f37072fd.pth``), if any."""
    match = _HASH_IN_NAME.search(file_name)
    return match.group(1) if match and match.group(1) else None


def sha256_file(path: str | os.PathLike) -> str:
    """The full sha256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_checkpoint(arch: str, progress: bool = True) -> Path:
    """Download ``arch``'s ImageNet checkpoint into the cache, checking its sha256 prefix.

    torch.hub writes to a ``.partial`` file beside the target and renames it only after the hash
    matched, so a failed or interrupted download never leaves a file under the expected name.
    Raises UserError (naming the URL and the target) when the download fails.
    """
    ckpt = imagenet_checkpoint(arch)
    try:
        return _download(ckpt, progress)
    except _DOWNLOAD_ERRORS as e:
        raise UserError(
            f"could not download {ckpt.url} to {ckpt.path} ({_one_line(e)}); check the network "
            f"(or https_proxy) and retry, or copy {ckpt.file_name} there from a machine that has it."
        ) from None


# What a failed download raises: URLError/HTTPError/timeouts are OSErrors, a truncated body is an
# HTTPException, a hash mismatch is torch.hub's RuntimeError.
_DOWNLOAD_ERRORS = (OSError, RuntimeError, http.client.HTTPException)


def _download(ckpt: ImagenetCheckpoint, progress: bool) -> Path:
    import torch.hub

    dst = ckpt.path
    dst.parent.mkdir(parents=True, exist_ok=True)
    old_timeout = socket.getdefaulttimeout()
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT_S)
    try:
        torch.hub.download_url_to_file(ckpt.url, str(dst), ckpt.hash_prefix, progress=progress)
    finally:
        socket.setdefaulttimeout(old_timeout)
    return dst


def resolve_pretrained(spec: str | None, arch: str, *, download: bool = True) -> Path | None:
    """Turn a ``--pretrained`` value into the checkpoint file to load (None for no weights).

    ``spec`` is ``None``/``"none"`` (random init), ``"imagenet"`` (torchvision's cached file for
    ``arch``, downloaded first if missing and ``download`` is true) or a path to a torchvision
    state_dict file. Raises UserError when the file is missing, with the two ways out.
    """
    check_arch(arch)
    kind = pretrained_kind(spec)
    if kind == "none":
        return None
    if kind == "imagenet":
        ckpt = imagenet_checkpoint(arch)
        if ckpt.path.is_file():
            return ckpt.path
        if download:
            try:
                return _download(ckpt, progress=True)
            except _DOWNLOAD_ERRORS as e:
                reason = f"downloading {ckpt.url} failed ({_one_line(e)})"
        else:
            reason = "downloads are off here"
        raise UserError(
            f"--pretrained imagenet: the ImageNet weights for --arch {arch} are not cached at "
            f"{ckpt.path} and {reason}; run `fasthpa weights fetch --arch {arch}` on "
            f"a machine with network access (with the same TORCH_HOME), or pass "
            f"--pretrained PATH to a copy of {ckpt.file_name}."
        )
    path = Path(os.path.expanduser(str(spec))).resolve()
    if not path.is_file():
        raise UserError(
            f"--pretrained: {path} is not a file (expected 'none', 'imagenet' or the path of a "
            f"torchvision {arch} checkpoint)."
        )
    return path


def pretrained_kind(spec: str | None) -> str:
    """``"none"``, ``"imagenet"`` or ``"path"``: how ``resolve_pretrained`` reads ``spec``."""
    if spec is None or str(spec).strip().lower() in ("", "none"):
        return "none"
    if str(spec).strip().lower() == "imagenet":
        return "imagenet"
    return "path"


def default_pretrained(arch: str) -> str:
    """``"imagenet"`` when ``arch``'s ImageNet checkpoint is in the cache, else ``"none"``.

    Never touches the network, so a default run on an offline node neither hangs nor fails.
    """
    return "imagenet" if imagenet_checkpoint(arch).path.is_file() else "none"


def resolve_pretrained_distributed(
    spec: str | None, arch: str, *, download: bool = True
) -> Path | None:
    """``resolve_pretrained`` for a DDP job: rank 0 resolves (and downloads), every rank loads it.

    Collective when a process group of more than one rank is initialised and ``spec`` is not
    ``none``: every rank must call it. Rank 0's error (a missing file, a failed download) is
    raised on every rank, so no rank is left waiting. Without a process group it is
    ``resolve_pretrained``. The file must be readable by every rank (a shared TORCH_HOME).
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return resolve_pretrained(spec, arch, download=download)
    check_arch(arch)
    if pretrained_kind(spec) == "none":
        return None
    rank = dist.get_rank()
    # [path, error message, whether the error is the user's]
    payload: list[Any] = [None, None, False]
    failure: BaseException | None = None
    if rank == 0:
        try:
            payload[0] = str(resolve_pretrained(spec, arch, download=download))
        except Exception as e:  # every rank must leave the broadcast, whatever went wrong
            failure = e
            payload[1] = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}"
            payload[2] = isinstance(e, UserError)
    dist.broadcast_object_list(payload, src=0)
    path_str, error, users_fault = payload
    if failure is not None:
        raise failure
    if error is not None:
        if users_fault:
            raise UserError(error)
        raise RuntimeError(f"rank 0 failed to resolve --pretrained {spec}: {error}")
    path = Path(path_str)
    if not path.is_file():
        raise UserError(
            f"--pretrained {spec}: rank {rank} cannot read {path}, which rank 0 resolved; put "
            f"TORCH_HOME on a filesystem every node shares, or pass --pretrained PATH to a copy "
            f"that every node can read."
        )
    return path


def cache_status(arch: str, check_hash: bool = True) -> dict[str, Any]:
    """One row of ``fasthpa weights list``: the expected file, whether it is there, its checks."""
    ckpt = imagenet_checkpoint(arch)
    path = ckpt.path
    row: dict[str, Any] = {
        "arch": arch,
        "weights": ckpt.weights,
        "file": ckpt.file_name,
        "path": str(path),
        "present": path.is_file(),
        "size_mb": None,
        "expected_size_mb": ckpt.file_size_mb,
        "hash_prefix": ckpt.hash_prefix,
        "sha256": None,
        "hash_ok": None,
    }
    if row["present"]:
        row["size_mb"] = path.stat().st_size / 1e6
        if check_hash:
            row["sha256"] = sha256_file(path)
            row["hash_ok"] = ckpt.hash_prefix is None or row["sha256"].startswith(ckpt.hash_prefix)
    return row


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _archs_from_flag(values: list[str]) -> list[str]:
    if "all" in values:
        return list(ARCHS)
    return list(dict.fromkeys(values))  # keep order, drop repeats


def configure_parser(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="weights_action", metavar="ACTION", required=True)
    arch_choices = (*ARCHS, "all")
    fetch = sub.add_parser(
        "fetch",
        help="download ImageNet checkpoints into the torch cache (needs network)",
        description=(
            "Download torchvision's ImageNet checkpoints into $TORCH_HOME/hub/checkpoints, "
            "checking the sha256 prefix in each file name; files already there and intact are "
            "kept."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    fetch.add_argument(
        "--arch",
        nargs="+",
        default=["resnet18"],
        choices=arch_choices,
        metavar="ARCH",
        help=f"architectures to fetch: {', '.join(arch_choices)}",
    )
    fetch.add_argument("--quiet", action="store_true", help="no download progress bar")
    listing = sub.add_parser(
        "list",
        help="show which ImageNet checkpoints are cached, with sizes and sha256 checks",
        description=(
            "Show, for each architecture, the checkpoint file --pretrained imagenet expects, "
            "whether it is cached, its size against torchvision's record and whether its sha256 "
            "starts with the prefix in its name."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    listing.add_argument(
        "--arch",
        nargs="+",
        default=["all"],
        choices=arch_choices,
        metavar="ARCH",
        help=f"architectures to list: {', '.join(arch_choices)}",
    )


def run(args: argparse.Namespace) -> int:
    if args.weights_action == "fetch":
        return _run_fetch(_archs_from_flag(args.arch), progress=not args.quiet)
    return _run_list(_archs_from_flag(args.arch))


def _run_fetch(archs: list[str], progress: bool) -> int:
    from rich.console import Console

    console = Console(stderr=True)
    console.print(f"cache: {cache_dir()}", soft_wrap=True)
    for arch in archs:
        status = cache_status(arch)
        if status["present"] and status["hash_ok"]:
            console.print(f"{arch}: already cached, sha256 ok: {status['path']}")
            continue
        if status["present"]:
            console.print(f"{arch}: cached file fails its sha256 check, downloading it again")
        path = download_checkpoint(arch, progress=progress)
        console.print(f"{arch}: downloaded {path} ({path.stat().st_size / 1e6:.1f} MB, sha256 ok)")
    return 0


def _run_list(archs: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for column in ("arch", "file", "cached", "MB (expected)", "sha256"):
        table.add_column(column, no_wrap=True)
    for arch in archs:
        row = cache_status(arch)
        expected = f"{row['expected_size_mb']:.1f}" if row["expected_size_mb"] else "?"
        if row["present"]:
            size = f"{row['size_mb']:.1f} ({expected})"
            if row["hash_prefix"] is None:
                check = f"{row['sha256'][:8]} (no hash in name)"
            elif row["hash_ok"]:
                check = "[green]ok[/]"
            else:
                check = f"[red]MISMATCH[/] {row['sha256'][: len(row['hash_prefix'])]}"
            present = "[green]yes[/]"
        else:
            size, check, present = f"({expected})", "-", "[yellow]no[/]"
        table.add_row(arch, row["file"], present, size, check)
    console = Console()
    # the expected path of each file is this folder joined with its `file`
    console.print(f"ImageNet checkpoints expected in {cache_dir()}", soft_wrap=True)
    console.print(table)
    console.print(
        "missing files: `fasthpa weights fetch --arch ARCH` on a machine with network, then "
        "share TORCH_HOME (or pass --pretrained PATH)"
    )
    return 0
