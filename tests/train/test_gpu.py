"""Training on a GPU (issue 6's recipes through the fast path): the EBM's negative samples come
from the CUDA-graph-captured `LangevinSampler` while the optimizer updates the model in place, and
the DDPM trains. Run by `bench/gpu_suite.sh`; skipped on machines without CUDA."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from train_helpers import run_train, write_npz

import puregen_fast as pg
from puregen_fast.sampling.backends import LangevinSampler

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
DEV = torch.device("cuda")


def test_graph_replay_sees_in_place_parameter_updates():
    """A captured graph reads the parameters' memory: after an optimizer-style in-place update
    the replay samples from the new model (what EBM training relies on)."""
    b = torch.backends
    old = b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32
    b.cuda.matmul.allow_tf32 = b.cudnn.allow_tf32 = False
    try:
        torch.manual_seed(0)
        ebm = pg.EBMSNGAN32(nf=32).to(DEV).train()  # parameters require grad, as in training
        # 16 rows, as the training run below and its sample grid: one compiled shape for all
        x = torch.rand(16, 3, 32, 32, device=DEV) * 2 - 1
        ids = torch.arange(16, device=DEV)
        s = LangevinSampler(ebm, 20, device=DEV)
        before = s(x, ids)
        with torch.no_grad():
            for p in ebm.parameters():
                p.mul_(1.02)
        after = s(x, ids)
        # a sampler built after the update cannot have stale weights; compare with it, not with
        # the reference (a random EBM's Langevin dynamics amplify summation-order differences)
        fresh = LangevinSampler(ebm, 20, device=DEV)(x, ids)
        assert s.captures == 1
        assert float((after - fresh).norm() / fresh.norm()) < 1e-5
        assert float((after - before).norm() / before.norm()) > 1e-4
    finally:
        b.cuda.matmul.allow_tf32, b.cudnn.allow_tf32 = old


def _npz(tmp_path, n=256, size=32):
    x = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    return write_npz(tmp_path / "data.npz", x)


def _metrics(out):
    return [json.loads(s) for s in (out / "metrics.jsonl").read_text().splitlines()]


def test_train_ebm_on_cuda_with_the_fast_sampler(tmp_path):
    out = tmp_path / "ebm"
    rc = run_train(
        "ebm", _npz(tmp_path), out, "--nf", "32", "--bank-size", "128", "--batch-size", "16",
        "--mcmc-steps", "10", "--steps", "12", "--device", "cuda", "--backend", "fast",
        "--no-progress", "--log-every", "4",
    )  # fmt: skip
    assert rc == 0
    recipe = json.loads((out / "recipe.json").read_text())
    assert "backend=fast" in recipe["describe"]["sampler"]
    assert "update: triton kernel" in recipe["describe"]["sampler"]
    rows = _metrics(out)
    assert rows[-1]["step"] == 12
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    pg.load_ebm(out)  # the output directory is a loadable EBM


def test_train_ddpm_on_cuda(tmp_path):
    out = tmp_path / "ddpm"
    rc = run_train(
        "ddpm", _npz(tmp_path), out, "--unet", "tiny", "--batch-size", "32", "--steps", "12",
        "--device", "cuda", "--no-progress", "--log-every", "4",
    )  # fmt: skip
    assert rc == 0
    rows = _metrics(out)
    assert rows[-1]["step"] == 12
    assert all(math.isfinite(r["loss"]) for r in rows if "loss" in r)
    pg.load_ddpm(out)
