"""The runtime glue: compile-then-DDP actually compiles (and DDPOptimizer sees the DDP
module), no_sync reaches DDP through the wrappers, the AMP choice, the optimiser choice."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.distributed as dist
from torch import nn

from fasthpa.runtime import amp_dtype, autocast_factory, make_optimizer, no_sync, wrap_model

CPU = torch.device("cpu")


@pytest.fixture()
def world_of_one():
    """A gloo process group of one rank in this process (torchrun's world of one)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(4, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 28))


@pytest.mark.slow
def test_compile_then_ddp_compiles_and_matches_eager(world_of_one):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    x = torch.randn(4, 4, 8, 8)
    eager = tiny()
    eager(x).sum().backward()
    model = tiny()
    wrapped = wrap_model(model, CPU, ddp=True, compile=True)
    assert isinstance(wrapped, nn.parallel.DistributedDataParallel)
    wrapped(x).sum().backward()
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    for a, b in zip(eager.parameters(), model.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-6)
    with no_sync(wrapped):  # a micro-batch that skips the all-reduce
        assert wrapped.require_backward_grad_sync is False


def test_no_sync_is_a_no_op_without_ddp():
    model = tiny()
    with no_sync(model):
        pass
    with no_sync(wrap_model(model, CPU)):
        pass


def test_amp_choice_and_autocast(monkeypatch):
    from fasthpa import runtime

    # auto: bf16 on a CPU with native bf16 instructions, off on one without
    for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        monkeypatch.setattr(torch.cpu, name, lambda: False, raising=False)
    assert not runtime.cpu_has_native_bf16() and amp_dtype("auto", CPU) is None
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert runtime.cpu_has_native_bf16() and amp_dtype("auto", CPU) is torch.bfloat16
    monkeypatch.undo()
    assert amp_dtype("bf16", CPU) is torch.bfloat16 and amp_dtype("off", CPU) is None
    with autocast_factory(CPU, torch.bfloat16)():
        y = nn.Linear(4, 4)(torch.randn(2, 4))
    assert y.dtype == torch.bfloat16
    with autocast_factory(CPU, None)():
        assert nn.Linear(4, 4)(torch.randn(2, 4)).dtype == torch.float32


def test_optimizer_is_adam_or_decoupled_adamw():
    params = list(tiny().parameters())
    assert type(make_optimizer(params, lr=1e-3, device=CPU)) is torch.optim.Adam
    adamw = make_optimizer(params, lr=1e-3, device=CPU, weight_decay=0.01)
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["weight_decay"] == 0.01
