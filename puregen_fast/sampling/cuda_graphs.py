"""Whole sampler loops captured as CUDA graphs over static buffers (DESIGN 6).

A loop ``loop(x, ids, stream, steps)`` updates ``x`` in place for every step number in the device
tensor ``steps``. `LoopGraphs` captures it once per (batch shape, stream) and replays it per
batch: the batch, its sample ids and the step numbers are copied into the static buffers first,
so each replay draws fresh keyed noise (kernels read seed, step and ids from device memory). A
smaller batch (the last one) is padded into an already captured larger shape, not re-captured.
Callers whose batch sizes vary (the `filt` method purifies a data-dependent subset of each batch)
pass ``pad_to``, the largest size to expect: a batch of b rows then always runs in the graph of
``bucket(b, pad_to)`` rows (b rounded up to a multiple of ``pad_to / 8``), so at most eight
shapes are compiled and captured, each at most ``pad_to / 8`` rows larger than needed, and the
shape a batch runs at does not depend on which batches came before (a resumed or sharded run
computes every batch as an uninterrupted one does). The samplers pad the same way without a
graph, so compiles stay bounded on CPU too. The graphs of one `LoopGraphs` share one memory
pool: they are replayed one at a time and nothing allocated inside a capture outlives it, so
their intermediates can share memory (filt and reps would otherwise hold one pool per graph).

Progress: without a graph the loop itself reports each step as the host issues it (``progress``,
outside any compiled region); a replay is one piece of work whose end the host knows, so it is
reported whole, once, after the replay is launched. Nothing reads the device to report it, and a
capture never sees the callback (it would run once, at capture, and never on replay).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["Loop", "LoopGraphs", "bucket", "pad_rows"]

# loop(x, ids, stream, steps[, progress]): update x in place over the step numbers in `steps`;
# ``progress(k)``, where given, is told of k more steps done
Loop = Callable[..., None]


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: torch.Tensor
    ids: torch.Tensor
    steps: torch.Tensor


def bucket(b: int, pad_to: int | None) -> int:
    """The batch size to capture for ``b`` rows when batches of up to ``pad_to`` are expected."""
    if not pad_to or b >= pad_to:
        return b
    q = -(-pad_to // 8)
    return min(pad_to, -(-b // q) * q)


def pad_rows(x: torch.Tensor, ids: torch.Tensor, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x and ids with zero rows (id 0) appended up to ``size`` rows."""
    k = size - x.shape[0]
    if k <= 0:
        return x, ids
    return torch.cat([x, x.new_zeros((k, *x.shape[1:]))]), torch.cat([ids, ids.new_zeros(k)])


class LoopGraphs:
    def __init__(
        self, device: torch.device, n_steps: int, loop: Loop, warmup: Loop,
        units: int | None = None,
    ) -> None:  # fmt: skip
        """``warmup`` runs a few steps before capture (compile, autotune, allocate). ``units``:
        the progress one loop reports (default ``n_steps``; the DDPM's forward noising is no
        step of its own)."""
        self.device, self.n_steps = device, n_steps
        self.units = n_steps if units is None else units
        self.loop, self.warmup = loop, warmup
        self._graphs: dict[tuple[int, ...], _Graph] = {}
        self._pool = None  # one memory pool for all of this loop's graphs (module doc)
        self.captures = 0  # graphs captured so far: tests check there is no re-capture

    def _capture(self, shape: torch.Size, stream: int) -> _Graph:
        dev = self.device
        x = torch.zeros(shape, device=dev)
        ids = torch.zeros(shape[0], dtype=torch.int64, device=dev)
        steps = torch.arange(self.n_steps, dtype=torch.int64, device=dev)
        side = torch.cuda.Stream(dev)
        side.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(side):
            self.warmup(x, ids, stream, steps)
        torch.cuda.current_stream(dev).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self._pool):
            self.loop(x, ids, stream, steps)
        self.captures += 1
        g = _Graph(graph, x, ids, steps)
        self._graphs[(*shape, stream)] = g
        return g

    def run(
        self,
        x: torch.Tensor,
        ids: torch.Tensor,
        stream: int,
        first_step: int,
        pad_to: int | None = None,
        graph: bool = True,
        progress: Callable[[int], Any] | None = None,
    ) -> torch.Tensor:
        """Replay the loop on a copy of ``x`` with step numbers ``first_step + [0, n_steps)``.
        ``graph=False`` runs the loop itself (no CUDA graph), padded to the same bucket.
        ``progress``: told of the steps done (module doc)."""
        b, rest = x.shape[0], tuple(x.shape[1:])
        if not graph:
            xp, ip = pad_rows(x, ids, bucket(b, pad_to))  # bounded shapes, bounded compiles
            out = xp.clone(memory_format=torch.contiguous_format)  # the kernels need dense rows
            steps = torch.arange(self.n_steps, dtype=torch.int64, device=self.device) + first_step
            if progress is None:
                self.loop(out, ip, stream, steps)
            else:
                self.loop(out, ip, stream, steps, progress)
            return out if out.shape[0] == b else out[:b].clone()
        if pad_to:  # always the bucket's graph: the shape must not depend on earlier batches
            size = bucket(b, pad_to)
            g = self._graphs.get((size, *rest, stream))
            if g is None:
                g = self._capture(torch.Size((size, *rest)), stream)
        else:
            fits = [k for k in self._graphs if k[1:-1] == rest and k[-1] == stream and k[0] >= b]
            g = self._graphs[min(fits)] if fits else self._capture(x.shape, stream)
        g.x[:b].copy_(x)
        g.ids[:b].copy_(ids)
        if b < g.x.shape[0]:  # padding rows: any finite state, any ids; results discarded
            g.x[b:].zero_()
            g.ids[b:].zero_()
        g.steps.copy_(torch.arange(self.n_steps, dtype=torch.int64, device=self.device))
        g.steps.add_(first_step)
        g.graph.replay()
        if progress is not None:  # the whole replay is issued: the host knows no finer
            progress(self.units)
        return g.x[:b].clone()
