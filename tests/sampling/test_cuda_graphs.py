"""`LoopGraphs` bookkeeping on CPU, with CUDA graphs emulated: a fake capture records the loop
call with its (static) tensor arguments and a replay runs it again on them, so values are read
from the static buffers at replay time and Python values are frozen at capture, as in a real
graph. Checks that the samplers' graph path equals their plain loop: fresh ids and step numbers
per replay, padding of a smaller batch, one capture per (shape, stream), the smallest fitting
graph chosen, and no host read of a tensor while capturing (outside the update kernels, whose
eager twins stand in here). The real capture runs in tests/test_fast_gpu.py on a GPU."""

import contextlib

import pytest
import torch

import puregen_fast as pg
from puregen_fast.kernels.langevin import langevin_step_eager
from puregen_fast.models.unet import UNET_PRESETS
from puregen_fast.sampling.backends import DDPMSampler, LangevinSampler
from puregen_fast.sampling.cuda_graphs import LoopGraphs, bucket


class FakeGraph:
    capturing: "FakeGraph | None" = None
    host_reads_ok = 0  # > 0 inside the update twins (Triton kernels on a GPU: no host reads)

    def __init__(self) -> None:
        self.calls: list = []

    def replay(self) -> None:
        for fn, args in self.calls:
            fn(*args)


class _Stream:
    def __init__(self, *a, **k) -> None:
        pass

    def wait_stream(self, other) -> None:
        pass


@contextlib.contextmanager
def _graph(g: FakeGraph, pool=None):
    FakeGraph.capturing = g
    try:
        yield
    finally:
        FakeGraph.capturing = None


def recording(loop):
    def rec(*args):
        if FakeGraph.capturing is not None:
            FakeGraph.capturing.calls.append((loop, args))
        loop(*args)

    return rec


_HOST_READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__")


def _no_host_reads(monkeypatch) -> None:
    """A real capture cannot read a device value on the host (it would sync, and a replay would
    not read it again): make every such read raise while capturing."""
    for name in _HOST_READS:
        real = getattr(torch.Tensor, name)

        def guarded(self, *a, _real=real, _name=name, **k):
            if FakeGraph.capturing is not None and not FakeGraph.host_reads_ok:
                raise AssertionError(f"Tensor.{_name}() while capturing a CUDA graph")
            return _real(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, guarded)


def _kernel(fn):
    def run(*a, **k):
        FakeGraph.host_reads_ok += 1
        try:
            return fn(*a, **k)
        finally:
            FakeGraph.host_reads_ok -= 1

    return run


@pytest.fixture
def fake_cuda(monkeypatch):
    _no_host_reads(monkeypatch)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", _graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: object())
    monkeypatch.setattr(torch.cuda, "Stream", _Stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())


def _graphed(sampler):
    """Switch a CPU sampler's fast loop onto its graph path (the config allows that on CUDA
    only)."""
    loop = sampler.fast
    loop.cuda_graph = True
    for name in ("_update", "_add_noise", "_step"):  # the kernels' eager twins read on the host
        if callable(getattr(loop, name, None)) and name in vars(loop):
            setattr(loop, name, _kernel(getattr(loop, name)))
    g = loop._graphs
    g.loop = recording(g.loop)
    return sampler


def padded(x, ids, b):
    """What a graph captured for batch b computes for a smaller batch: zero rows, zero ids."""
    k = b - x.shape[0]
    return torch.cat([x, x.new_zeros(k, *x.shape[1:])]), torch.cat([ids, ids.new_zeros(k)])


def toy_loop(n: int):
    def loop(x, ids, stream, steps):
        for i in range(n):
            _kernel(langevin_step_eager)(x, x * x, grad_scale=0.1, noise_scale=0.5, seed=9,
                                         step=steps[i], sample_ids=ids, stream=stream)  # fmt: skip

    return loop


def test_loop_graphs_replay_pad_and_pick(fake_cuda):
    n = 4
    loop = toy_loop(n)
    graphs = LoopGraphs(torch.device("cpu"), n, recording(loop), loop)

    def direct(x, ids, stream, first):
        out = x.clone()
        loop(out, ids, stream, torch.arange(n) + first)
        return out

    x = torch.randn(8, 2, 3, 3)
    ids = torch.arange(8) + 2**40
    out = graphs.run(x, ids, 1, 0)
    assert graphs.captures == 1 and torch.equal(out, direct(x, ids, 1, 0))
    # new ids and a new step window are read from the static buffers at replay
    assert torch.equal(graphs.run(x, ids + 8, 1, 7), direct(x, ids + 8, 1, 7))
    # a smaller batch is padded into the captured one; its rows are unchanged by the padding
    assert torch.equal(graphs.run(x[:3], ids[:3], 1, 7), direct(x[:3], ids[:3], 1, 7))
    assert graphs.captures == 1
    # another stream is another graph (the stream is frozen into a capture)
    assert torch.equal(graphs.run(x, ids, 2, 0), direct(x, ids, 2, 0))
    assert graphs.captures == 2
    # a larger batch captures anew; later a middle-sized one takes the smallest graph that fits
    big = torch.randn(16, 2, 3, 3)
    graphs.run(big, torch.arange(16), 1, 0)
    assert graphs.captures == 3
    seen = []
    for key, g in graphs._graphs.items():
        g.graph.replay = (lambda k, r: lambda: (seen.append(k), r())[1])(key, g.graph.replay)
    graphs.run(big[:5], torch.arange(5), 1, 0)
    assert seen == [(8, 2, 3, 3, 1)] and graphs.captures == 3
    # another image shape never reuses a graph
    graphs.run(torch.randn(2, 2, 4, 4), torch.arange(2), 1, 0)
    assert graphs.captures == 4


def test_langevin_graph_path_equals_plain_loop(fake_cuda):
    torch.manual_seed(0)
    ebm = pg.EBMSNGAN32(nf=4).eval().requires_grad_(False)
    x = torch.rand(6, 3, 8, 8) * 2 - 1
    ids = torch.arange(6) + 2**33
    plain = LangevinSampler(ebm, 5, seed=3, compile=False)
    graphed = _graphed(LangevinSampler(ebm, 5, seed=3, compile=False))
    for off, shift in ((0, 0), (5, 6)):
        want = plain(x, ids + shift, step_offset=off)
        assert torch.equal(graphed(x, ids + shift, step_offset=off), want), (off, shift)
    # a smaller batch: bit-equal to the padded batch (a batch's size changes CPU rounding)
    xp, ip = padded(x[:4], ids[:4] + 12, 6)
    want = plain(xp, ip, step_offset=10)[:4]
    assert torch.equal(graphed(x[:4], ids[:4] + 12, step_offset=10), want)
    assert graphed.captures == 1


def test_ddpm_graph_path_equals_plain_loop(fake_cuda):
    torch.manual_seed(0)
    unet = pg.UNet2D.from_config({**UNET_PRESETS["tiny"], "sample_size": 8}).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    x = torch.rand(4, 3, 8, 8) * 2 - 1
    ids = torch.arange(4) + 11
    sched = pg.DDPMSchedule()
    plain = DDPMSampler(unet, sched, 3, seed=5, compile=False)
    graphed = _graphed(DDPMSampler(unet, sched, 3, seed=5, compile=False))
    for shift in (0, 4):
        assert torch.equal(graphed(x, ids + shift), plain(x, ids + shift))
    xp, ip = padded(x[1:3], ids[1:3] + 9, 4)
    assert torch.equal(graphed(x[1:3], ids[1:3] + 9), plain(xp, ip)[:2])
    assert graphed.captures == 1


def test_bucket():
    assert [bucket(b, 64) for b in (1, 8, 9, 31, 57, 64, 70)] == [8, 8, 16, 32, 64, 64, 70]
    assert bucket(5, None) == 5 and bucket(3, 3) == 3
    assert bucket(2, 10) == 2 and bucket(3, 10) == 4 and bucket(9, 10) == 10  # q = ceil(10/8) = 2
    for pad_to in (1, 7, 16, 100, 512):
        sizes = {bucket(b, pad_to) for b in range(1, pad_to + 1)}
        assert len(sizes) <= 8 and all(s <= pad_to for s in sizes)
        assert all(0 <= bucket(b, pad_to) - b < -(-pad_to // 8) for b in range(1, pad_to + 1))


def test_varying_batches_capture_at_most_eight_shapes(fake_cuda):
    """`filt` purifies a data-dependent subset of each batch: with pad_to the captures (and the
    compiles behind them) stay bounded, and every result equals the plain loop's."""
    n = 2
    loop = toy_loop(n)
    graphs = LoopGraphs(torch.device("cpu"), n, recording(loop), loop)
    used = []

    def spy_replays():
        for key, g in graphs._graphs.items():
            if not hasattr(g.graph, "spied"):
                g.graph.spied = True
                g.graph.replay = (lambda k, r: lambda: (used.append(k[0]), r())[1])(
                    key, g.graph.replay
                )

    gen = torch.Generator().manual_seed(0)
    # a large subset first, then small ones: each still runs at its own bucket's size, not in
    # the large graph (the shape a batch runs at must not depend on the batches before it)
    sizes = [30, 3] + torch.randint(1, 33, (40,), generator=gen).tolist()
    for size in sizes:
        x = torch.randn(size, 2, 3, 3, generator=gen)
        ids = torch.randperm(1000, generator=gen)[:size]
        want = x.clone()
        loop(want, ids, 1, torch.arange(n))
        spy_replays()
        used.clear()
        out = graphs.run(x, ids, 1, 0, pad_to=32)
        assert torch.equal(out, want)
        assert (bucket(size, 32), 2, 3, 3, 1) in graphs._graphs
        assert used in ([bucket(size, 32)], [])  # [] when this call captured that graph
    assert graphs.captures <= 8


def test_samplers_pad_without_a_graph_too():
    """On CPU (no graph) a varying batch is padded to its bucket as well: bounded compiles."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    ebm = pg.EBMSNGAN32(nf=4).eval().requires_grad_(False)
    plain = LangevinSampler(ebm, 2, compile=False)
    s = LangevinSampler(ebm, 2, temp=2e-4)  # compiled; its own temp: a fresh compile
    x, ids = torch.rand(8, 3, 8, 8) * 2 - 1, torch.arange(8) + 3
    counters.clear()
    for b in (1, 5, 8):  # one bucket of pad_to=64: 8 rows
        xp, ip = padded(x[:b], ids[:b], 8)
        want = LangevinSampler(ebm, 2, temp=2e-4, compile=False)(xp, ip)[:b]
        got = s(x[:b], ids[:b], pad_to=64)
        assert got.shape[0] == b
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 2  # the gradient (and the update twin) once
    assert plain(x[:3], ids[:3], pad_to=64).shape[0] == 3
