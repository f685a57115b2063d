"""The eager DARTS baseline the benches compare with: it is the dense formulation, and its architecture
step computes gradients for every weight too (what the engine's steps avoid)."""
from __future__ import annotations

import torch

from engine.arch import Architecture
from engine.genotype import CELL_TYPES
from engine.baseline import EagerDarts
from engine.network import Network, darts_spec


def test_eager_darts_is_the_dense_softmax_sum_and_its_arch_step_reaches_every_weight():
    torch.manual_seed(0)
    net, arch = Network(darts_spec(1, 10, 4, 3)), Architecture(init_std=0.5)
    x, y = torch.randn(4, 1, 12, 12), torch.randint(0, 10, (4,))
    darts = EagerDarts(net, arch, torch.optim.SGD(net.parameters(), lr=0.1),
                       torch.optim.Adam(arch.parameters(), lr=0.1))
    softmax = {t: torch.softmax(arch.logits[t], 1) for t in CELL_TYPES}
    assert torch.equal(darts.forward(x, "search"), net(x, dense=softmax))
    assert torch.allclose(darts.forward(x, "warmup"), net(x, arch.sample("warmup")), atol=1e-6)

    darts.forward_backward(x, y)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in arch.parameters())
    touched = [p for p in net.parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(touched) > len(list(net.parameters())) // 2  # every op on every edge: most weights get gradients

    before = [p.detach().clone() for p in net.parameters()]
    logits = [p.detach().clone() for p in arch.parameters()]
    darts.weight_step(x, y, "search")
    assert all(torch.equal(a, b) for a, b in zip(logits, arch.parameters()))  # weight step: weights only
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))
    darts.arch_step(x, y, "search")
    assert not all(torch.equal(a, b) for a, b in zip(logits, arch.parameters()))


def test_the_baseline_runs_darts_own_dilated_convs():
    """The eager DARTS baseline times nn.Conv2d's dilated conv, not the engine's even-pixel one; both give
    the same outputs."""
    from engine.baseline import darts_convolutions
    from engine.ops import Depthwise, make_op
    op = make_op("dil_conv_5x5", 4, 2, affine=False)
    x = torch.randn(3, 4, 9, 9)
    engine_out = op(x)
    darts_convolutions(op)
    assert not any(m.even_pixels for m in op.modules() if isinstance(m, Depthwise))
    assert torch.equal(op(x), engine_out)


def test_the_layout_bench_runs_and_writes_its_rows(tmp_path):
    """bench/layouts.py (the timings behind engine/ops.py's layout choices), at toy size: every case and
    variant is timed once and written; nothing about the times is asserted."""
    import json

    from .conftest import load_bench
    out = tmp_path / "layouts.json"
    assert load_bench("layouts").main(["--reps", "1", "--batch", "2", "--json", str(out)]) == 0
    records = json.loads(out.read_text())["records"]
    cases = {(r["case"], r["variant"]) for r in records}
    assert ("dilated-strided", "even-pixels") in cases and ("relu-backward", "contiguous") in cases
    assert all(r["ms"] > 0 for r in records)
