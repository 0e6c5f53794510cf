"""The ImageNet weights cache: resolve, `fasthpa weights fetch/list`, and rank-0 resolution in DDP.

No test reaches the network: torch.hub's urlopen is replaced, or the URL is a local file:// URL.
The reference for file names and folders is torchvision's own weights enum and torch.hub.
"""

from __future__ import annotations

import email.message
import hashlib
import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.hub
import torchvision

import fasthpa.weights as weights
from fasthpa.cli import main
from fasthpa.errors import UserError
from fasthpa.weights import (
    ARCHS,
    ImagenetCheckpoint,
    cache_dir,
    default_pretrained,
    imagenet_checkpoint,
    resolve_pretrained,
    resolve_pretrained_distributed,
)


def _offline(*args, **kwargs):
    raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    """A fresh, empty TORCH_HOME on a machine with no network."""
    home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setenv("COLUMNS", "200")  # rich tables wide enough to read whole names
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    monkeypatch.setattr(torch.hub, "urlopen", _offline)
    return home


def checkpoints_dir(torch_home: Path) -> Path:
    return torch_home / "hub" / "checkpoints"


def save_random_resnet18(path: Path, seed: int = 0) -> bytes:
    torch.manual_seed(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), path)
    return path.read_bytes()


def fake_checkpoint_served_from(src: Path) -> ImagenetCheckpoint:
    """An ImageNet checkpoint entry whose URL is the local file `src` (named like torchvision's)."""
    return ImagenetCheckpoint("resnet18", "Fake_Weights.TEST", src.as_uri(), 44.661)


def test_names_and_folder_are_torchvision_s(torch_home):
    assert cache_dir() == checkpoints_dir(torch_home)
    for arch in ARCHS:
        enum_default = torchvision.models.get_model_weights(arch).DEFAULT
        ckpt = imagenet_checkpoint(arch)
        assert ckpt.url == enum_default.url
        assert ckpt.path == checkpoints_dir(torch_home) / enum_default.url.rsplit("/", 1)[-1]
        assert ckpt.hash_prefix and ckpt.file_name == f"{arch}-{ckpt.hash_prefix}.pth"
        assert ckpt.file_size_mb == enum_default.meta["_file_size"]


def test_default_pretrained_is_imagenet_only_when_cached(torch_home):
    assert [default_pretrained(a) for a in ARCHS] == ["none"] * len(ARCHS)
    save_random_resnet18(imagenet_checkpoint("resnet18").path)
    assert default_pretrained("resnet18") == "imagenet"
    assert default_pretrained("resnet34") == "none"


def test_resolve_pretrained_specs(torch_home, tmp_path):
    assert resolve_pretrained(None, "resnet18") is None
    assert resolve_pretrained("none", "resnet18") is None
    mine = tmp_path / "mine.pth"
    save_random_resnet18(mine)
    assert resolve_pretrained(str(mine), "resnet18") == mine.resolve()
    with pytest.raises(UserError, match="downloads are off"):
        resolve_pretrained("imagenet", "resnet18", download=False)
    with pytest.raises(UserError, match="--arch: unknown architecture 'resnet101'"):
        resolve_pretrained("imagenet", "resnet101")
    # without a process group the distributed variant is the plain one
    save_random_resnet18(imagenet_checkpoint("resnet18").path)
    assert (
        resolve_pretrained_distributed("imagenet", "resnet18")
        == imagenet_checkpoint("resnet18").path
    )


def test_list_shows_expected_files_presence_and_hash_check(torch_home, capsys):
    assert main(["weights", "list"]) == 0
    out = capsys.readouterr().out
    assert str(checkpoints_dir(torch_home)) in out
    for arch in ARCHS:
        assert imagenet_checkpoint(arch).file_name in out
    assert out.count(" no ") == len(ARCHS)

    # a file under torchvision's name whose sha256 does not start with the name's hash
    save_random_resnet18(imagenet_checkpoint("resnet18").path)
    assert main(["weights", "list", "--arch", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" in out and "yes" in out and "resnet34" not in out


def test_list_reports_an_intact_file_as_ok(torch_home, tmp_path, monkeypatch, capsys):
    src = tmp_path / "src" / "resnet18.pth"
    data = save_random_resnet18(src)
    named = src.with_name(f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth")
    src.rename(named)
    monkeypatch.setattr(
        weights, "imagenet_checkpoint", lambda arch: fake_checkpoint_served_from(named)
    )
    (checkpoints_dir(torch_home)).mkdir(parents=True)
    (checkpoints_dir(torch_home) / named.name).write_bytes(data)
    row = weights.cache_status("resnet18")
    assert row["present"] and row["hash_ok"] and row["sha256"] == hashlib.sha256(data).hexdigest()
    assert main(["weights", "list", "--arch", "resnet18"]) == 0
    out = capsys.readouterr().out
    assert "ok" in out and "MISMATCH" not in out


def test_fetch_offline_is_a_clear_error_and_writes_nothing(torch_home, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["weights", "fetch", "--arch", "resnet18", "--quiet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    ckpt = imagenet_checkpoint("resnet18")
    assert f"error: could not download {ckpt.url} to {ckpt.path}" in err
    assert "Temporary failure in name resolution" in err
    assert list(checkpoints_dir(torch_home).iterdir()) == []


class _DroppedConnection:
    """An HTTP response that sends part of the body, then the connection drops."""

    def __init__(self, folder: Path):
        self.folder, self.sent, self.partial_seen = folder, 0, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def info(self):
        headers = email.message.Message()
        headers["Content-Length"] = str(45_000_000)
        return headers

    def read(self, n: int) -> bytes:
        if self.sent >= 3 * 8192:
            # torch.hub is writing to a temporary file beside the target right now
            self.partial_seen = any(p.name.endswith(".partial") for p in self.folder.iterdir())
            raise ConnectionResetError(104, "Connection reset by peer")
        self.sent += 8192
        return b"\0" * 8192


def test_fetch_interrupted_download_leaves_nothing_half_written(torch_home, monkeypatch, capsys):
    response = _DroppedConnection(checkpoints_dir(torch_home))
    monkeypatch.setattr(torch.hub, "urlopen", lambda *a, **k: response)
    with pytest.raises(SystemExit) as exit_info:
        main(["weights", "fetch", "--arch", "resnet18", "--quiet"])
    assert exit_info.value.code == 2
    assert "Connection reset by peer" in capsys.readouterr().err
    assert response.partial_seen, "the test must interrupt a download that had started writing"
    assert list(checkpoints_dir(torch_home).iterdir()) == []


def test_fetch_downloads_checks_the_hash_and_replaces_a_corrupt_file(
    torch_home, tmp_path, monkeypatch, capsys
):
    src = tmp_path / "server" / "resnet18.pth"
    data = save_random_resnet18(src)
    served = src.with_name(f"resnet18-{hashlib.sha256(data).hexdigest()[:8]}.pth")
    src.rename(served)
    monkeypatch.setattr(torch.hub, "urlopen", urllib.request.urlopen)
    monkeypatch.setattr(
        weights, "imagenet_checkpoint", lambda arch: fake_checkpoint_served_from(served)
    )
    target = checkpoints_dir(torch_home) / served.name
    target.parent.mkdir(parents=True)
    target.write_bytes(data[: len(data) // 2])  # a corrupt copy from an earlier attempt

    assert main(["weights", "fetch", "--quiet"]) == 0
    assert target.read_bytes() == data
    assert sorted(p.name for p in target.parent.iterdir()) == [served.name]
    assert "downloaded" in capsys.readouterr().err

    monkeypatch.setattr(torch.hub, "urlopen", _offline)  # an intact file is not fetched again
    assert main(["weights", "fetch", "--quiet"]) == 0
    assert "already cached" in capsys.readouterr().err


def test_fetch_rejects_a_download_whose_hash_does_not_match_its_name(
    torch_home, tmp_path, monkeypatch, capsys
):
    served = tmp_path / "server" / "resnet18-deadbeef.pth"
    save_random_resnet18(served)
    monkeypatch.setattr(torch.hub, "urlopen", urllib.request.urlopen)
    monkeypatch.setattr(
        weights, "imagenet_checkpoint", lambda arch: fake_checkpoint_served_from(served)
    )
    with pytest.raises(SystemExit) as exit_info:
        main(["weights", "fetch", "--quiet"])
    assert exit_info.value.code == 2
    assert "invalid hash value" in capsys.readouterr().err
    assert list(checkpoints_dir(torch_home).iterdir()) == []


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _state_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        digest.update(key.encode())
        digest.update(value.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _ddp_worker(rank: int, world_size: int, port: int, torch_home: str, out_dir: str) -> None:
    import datetime

    import torch.distributed as dist

    from fasthpa.model import build_model

    os.environ["TORCH_HOME"] = torch_home
    torch.set_num_threads(1)
    torch.hub.urlopen = _offline
    calls: list[str] = []
    plain_resolve = weights.resolve_pretrained

    def counting_resolve(spec, arch, **kwargs):
        calls.append(arch)
        return plain_resolve(spec, arch, **kwargs)

    weights.resolve_pretrained = counting_resolve
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world_size,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        torch.manual_seed(0)
        model, info = build_model("resnet18", pretrained="imagenet")
        mine = {"rank": rank, "digest": _state_digest(model), "file": info["weights_file"]}
        mine["resolve_calls"] = len(calls)
        everyone: list = [None] * world_size
        dist.all_gather_object(everyone, mine)
        # rank 0's failure (no resnet34 file, no network) must reach every rank, not hang them
        try:
            resolve_pretrained_distributed("imagenet", "resnet34")
            error = None
        except UserError as e:
            error = str(e)
        result = {"everyone": everyone, "error": error, "resolve_calls": len(calls)}
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_rank0_resolves_once_and_every_rank_loads_the_same_weights(torch_home, tmp_path):
    import torch.multiprocessing as mp

    from fasthpa.model import build_model

    path = imagenet_checkpoint("resnet18").path
    save_random_resnet18(path, seed=5)
    torch.manual_seed(0)
    single_process, _ = build_model("resnet18", pretrained="imagenet")
    out_dir = tmp_path / "ranks"
    out_dir.mkdir()
    mp.spawn(
        _ddp_worker,
        args=(2, _free_port(), str(torch_home), str(out_dir)),
        nprocs=2,
        join=True,
    )
    results = [json.loads((out_dir / f"rank{r}.json").read_text()) for r in range(2)]
    everyone = results[0]["everyone"]
    assert results[1]["everyone"] == everyone
    assert [e["resolve_calls"] for e in everyone] == [1, 0]  # only rank 0 resolved
    assert {e["file"] for e in everyone} == {str(path)}
    assert {e["digest"] for e in everyone} == {_state_digest(single_process)}
    for result in results:
        assert "fasthpa weights fetch --arch resnet34" in result["error"]
        assert "--pretrained PATH" in result["error"]
    assert [r["resolve_calls"] for r in results] == [2, 0]
