"""Compiled steps: compiled == eager, zero recompiles in steady state, invalidate() recompiles each graph
exactly once, NVTX changes nothing, and (on CUDA) the static weight steps replay as CUDA graphs.

Compiles on this CPU are slow, so the networks here are tiny (one or two cells, 8x8 images)."""
from __future__ import annotations

import pytest
import torch

from engine.config import preset
from engine.data import Cycle
from engine.profiling import enable_nvtx
from engine.trainer import Trainer

TINY = ["synthetic_size=8", "synthetic_train=256", "synthetic_test=64", "channels=4", "layers=1", "batch_size=16",
        "optimize_batch_size=16", "stem_multiplier=1"]


def _trainer(tmp_path, name, *overrides):
    return Trainer(preset("smoke").override(TINY + list(overrides)), str(tmp_path / name), log=lambda *_: None)


def _batches(trainer, key, n):
    return Cycle(trainer.loaders[key]).take(n)


def _losses(trainer, phase, n, batches, arch_batches=None):
    steps = trainer.steps if phase != "optimize" else trainer.final_steps
    steps.prepare(None if phase == "optimize" else phase)
    losses = []
    for i in range(n):
        x, y = batches[i]
        r = steps.weight_step(x, y, None if phase == "optimize" else phase)
        losses.append(r.loss)
        if arch_batches is not None:
            losses.append(steps.arch_step(*arch_batches[i], phase).loss)
    return losses


def _same(a, b, rtol=2e-3):
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert abs(u - v) <= rtol * max(abs(v), 1e-3), f"step {i}: compiled {u:.6f} vs eager {v:.6f}"


def _same_state(comp, eager, phase, x):
    """After the same steps, the compiled and the eager run hold the same network: parameters, BatchNorm running
    statistics (and their update counts, exactly), and the eval-mode output on batch `x`.

    Tolerances: inductor sums in another order than eager, so float32 values part by rounding, compounded by
    the 20 SGD steps (measured 2026-12-05 after the warmup test's steps: at most 5.2e-6, in values up to 1.6).
    rtol 1e-3 with atol 1e-4 leaves over an order of magnitude for that and none for a lost update: one
    BatchNorm update dropped moves a running statistic by momentum (0.1) times its batch deviation, ~1e-2 at
    these sizes (with every update dropped in the compiled run, as a mutant: 0.31, while the losses agreed),
    and an SGD step dropped moves a weight by lr x grad, ~1e-3 and up."""
    key = "optimize" if phase == "optimize" else "supernet"
    nets = [t.final_net if key == "optimize" else t.net for t in (comp, eager)]
    state = [dict(n.named_parameters()) | dict(n.named_buffers()) for n in nets]
    if key == "supernet":  # and the architecture steps' logits
        for st, t in zip(state, (comp, eager)):
            st.update({f"logits.{k}": v for k, v in t.arch.logits.items()})
    assert state[0].keys() == state[1].keys()
    for name, a in state[0].items():
        b = state[1][name]
        if "num_batches_tracked" in name:
            assert torch.equal(a, b), name
        else:
            assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), f"{name}: max |diff| {(a - b).abs().max():.2e}"
    outs = []
    for t, net in zip((comp, eager), nets):
        net.eval()
        with torch.no_grad(), t.steps.eager():
            outs.append(net(x, t.arch.sample("argmax")) if key == "supernet" else net(x))
        net.train()
    assert torch.allclose(outs[0], outs[1], rtol=1e-3, atol=1e-4), f"eval output max |diff| {(outs[0] - outs[1]).abs().max():.2e}"


@pytest.mark.slow
def test_compiled_and_eager_warmup_steps_agree_then_no_recompiles(tmp_path):
    eager = _trainer(tmp_path, "e", "compile=off")
    comp = _trainer(tmp_path, "c", "compile=on")
    batches = _batches(eager, "train", 20)
    want = _losses(eager, "warmup", 20, batches)
    before = comp.steps.monitor.totals()
    got = _losses(comp, "warmup", 20, batches)
    _same(got, want)
    _same_state(comp, eager, "warmup", batches[0][0])
    mid = comp.steps.monitor.totals()
    assert mid["compiles"] - before["compiles"] == 1 and mid["recompiles"] == before["recompiles"]
    _losses(comp, "warmup", 10, batches)  # steady state
    assert comp.steps.monitor.totals()["compiles"] == mid["compiles"]
    assert comp.steps.monitor.totals()["recompiles"] == mid["recompiles"]


@pytest.mark.slow
def test_compiled_and_eager_search_steps_agree_then_no_recompiles(tmp_path):
    eager = _trainer(tmp_path, "e", "compile=off")
    comp = _trainer(tmp_path, "c", "compile=on")
    batches, arch_batches = _batches(eager, "train", 20), _batches(eager, "arch", 20)
    want = _losses(eager, "search", 20, batches, arch_batches)
    mon = comp.steps.monitor
    x, y = batches[0]
    comp.steps.precompile(x, y, "search")  # every op variant once; weights and BN statistics untouched
    compiled = mon.totals()
    got = _losses(comp, "search", 20, batches, arch_batches)
    _same(got, want)
    _same_state(comp, eager, "search", batches[0][0])
    after = mon.totals()
    assert after["compiles"] == compiled["compiles"] and after["recompiles"] == compiled["recompiles"], \
        "a sampled architecture compiled something after precompile"
    graphs = {g for g in mon.graphs if g.startswith("op:")}
    assert len(graphs) >= 6  # max/avg pool, sep 3/5, dil 3/5 at the cell's resolution


@pytest.mark.slow
def test_invalidate_recompiles_each_graph_exactly_once(tmp_path):
    comp = _trainer(tmp_path, "c", "compile=on")
    mon, steps = comp.steps.monitor, comp.steps
    batches = _batches(comp, "train", 6)
    x, y = batches[0]
    steps.precompile(x, y, "search")
    graphs = {g for g in mon.graphs if g.startswith("op:")}
    _losses(comp, "search", 3, batches, _batches(comp, "arch", 3))
    before = mon.totals()
    steps.invalidate()
    steps.precompile(x, y, "search")
    after = mon.totals()
    assert after["recompiles"] - before["recompiles"] == len(graphs)
    assert after["compiles"] == before["compiles"]
    reasons = {e.reason for e in mon.events[-len(graphs):]}
    assert reasons == {"invalidated"}
    _losses(comp, "search", 3, batches, _batches(comp, "arch", 3))
    assert mon.totals()["recompiles"] == after["recompiles"]  # then zero


@pytest.mark.slow
def test_compiled_optimize_phase_matches_eager(tmp_path):
    eager = _trainer(tmp_path, "e", "compile=off")
    comp = _trainer(tmp_path, "c", "compile=on")
    for t in (eager, comp):
        t.build_final(t.arch.genotype())
    batches = _batches(eager, "optimize", 20)
    _same(_losses(comp, "optimize", 20, batches), _losses(eager, "optimize", 20, batches))
    _same_state(comp, eager, "optimize", batches[0][0])
    mon = comp.final_steps.monitor
    before = mon.totals()
    _losses(comp, "optimize", 5, batches)
    assert mon.totals()["compiles"] == before["compiles"] and mon.totals()["recompiles"] == before["recompiles"]


def test_compile_totals_reach_the_metrics(tmp_path):
    trainer = _trainer(tmp_path, "m", "compile=off", "warmup_epochs=1", "search_epochs=0", "growth_epochs=0",
                       "optimize_epochs=0")
    trainer.run()
    import json
    record = json.loads((tmp_path / "m" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["compiles"] == 0 and record["recompiles"] == 0 and record["compile_s"] == 0.0


def test_nvtx_on_and_off_give_the_same_losses(tmp_path):
    runs = []
    for on in (False, True):
        enable_nvtx(on)
        try:
            t = _trainer(tmp_path, f"n{on}", "compile=off")
            batches, arch_batches = _batches(t, "train", 5), _batches(t, "arch", 5)
            runs.append(_losses(t, "warmup", 5, batches) + _losses(t, "search", 5, batches, arch_batches))
        finally:
            enable_nvtx(False)
    assert runs[0] == runs[1]


def test_nvtx_ranges_are_free_when_off():
    from engine.profiling import nvtx_range
    enable_nvtx(False)
    assert nvtx_range("a") is nvtx_range("b")  # one shared no-op context manager


def test_profile_command_writes_a_trace_per_phase(tmp_path, capsys):
    from engine.cli import main
    assert main(["profile", "--preset", "smoke", "--steps", "2", "--top", "5", "--out", str(tmp_path),
                 "--set", "compile=off"]) == 0
    out = capsys.readouterr().out
    for phase in ("warmup", "search", "growth", "optimize"):
        assert (tmp_path / f"{phase}.json").stat().st_size > 1000
        assert f"== {phase}: 2 steps" in out
    assert "Self CPU" in out


@pytest.mark.cuda
def test_static_weight_steps_replay_as_cuda_graphs(tmp_path):
    from torch._dynamo.utils import counters
    comp = _trainer(tmp_path, "g", "compile=on", "device=cuda")
    assert comp.steps.policy["mode"] == "reduce-overhead"
    batches = _batches(comp, "train", 6)
    counters.clear()
    _losses(comp, "warmup", 6, batches)
    assert not counters["inductor"].get("cudagraph_skips"), dict(counters["inductor"])
    from torch._inductor import cudagraph_trees
    assert cudagraph_trees.get_manager(torch.cuda.current_device(), create_if_none_exists=False) is not None


def test_flip_evaluation_averages_the_logits_of_image_and_mirror():
    import torch.nn.functional as F
    from engine.genotype import Genotype
    from engine.network import Network, darts_spec
    from engine.steps import Steps
    g = Genotype.from_json({t: [["sep_conv_3x3", 0], ["max_pool_3x3", 1]] * 4 for t in ("normal", "reduce")}
                           | {"normal_concat": [2, 3, 4, 5], "reduce_concat": [2, 3, 4, 5]})
    net = Network(darts_spec(1, 10, 4, 3), g)
    steps = Steps(net, torch.optim.SGD(net.parameters(), lr=0.1))
    x, y = torch.randn(37, 1, 12, 12), torch.randint(0, 10, (37,))
    batches = [(x[:20], y[:20]), (x[20:], y[20:])]
    net.eval()
    with torch.no_grad():
        mean = 0.5 * (net(x) + net(x.flip(-1)))
    loss, acc = steps.evaluate(batches, flip=True)
    assert acc == pytest.approx(float((mean.argmax(1) == y).float().mean()))
    assert loss == pytest.approx(float(F.cross_entropy(mean, y)), rel=1e-5)
    # the mean over both views does not depend on which view the loader gives
    assert steps.evaluate([(x.flip(-1), y)], flip=True) == pytest.approx((loss, acc), rel=1e-5)
    assert steps.evaluate(batches) != pytest.approx((loss, acc), rel=1e-5)


@pytest.mark.slow
def test_drop_path_schedule_recompiles_nothing(tmp_path):
    """The probability lives in a device tensor: changing it each epoch (the cifar10 preset) keeps the compiled
    optimize graph (on CUDA its CUDA graph) as it is; the graph compiles with fullgraph=True (no break)."""
    comp = _trainer(tmp_path, "d", "compile=static", "drop_path=0.2")
    final = comp.build_final(comp.arch.genotype())
    batches = _batches(comp, "optimize", 6)
    final.net.set_drop_path(0.0)
    _losses(comp, "optimize", 2, batches)
    mon = comp.final_steps.monitor
    before = {k: mon.totals()[k] for k in ("compiles", "recompiles")}
    assert before["compiles"] >= 1
    for prob in (0.1, 0.2):
        final.net.set_drop_path(prob)
        _losses(comp, "optimize", 2, batches)
    assert {k: mon.totals()[k] for k in ("compiles", "recompiles")} == before


@pytest.mark.cuda
def test_cuda_weight_steps_read_nothing_and_search_steps_do_not_recompile(tmp_path):
    from engine.hostreads import HostReads
    eager = _trainer(tmp_path, "r", "compile=off", "device=cuda")
    assert eager.steps.sync_free
    batches, arch_batches = _batches(eager, "train", 12), _batches(eager, "arch", 12)
    for x, y in batches[:2]:
        eager.steps.weight_step(x, y, "warmup")
    with HostReads() as reads:
        for x, y in batches[2:6]:
            eager.steps.weight_step(x, y, "warmup")
    assert reads.count == 0, reads.report()
    comp = _trainer(tmp_path, "c", "compile=on", "device=cuda")
    x, y = batches[0]
    comp.steps.precompile(x, y, "search")
    before = comp.steps.monitor.totals()
    _losses(comp, "search", 8, batches, arch_batches)
    after = comp.steps.monitor.totals()
    assert (after["compiles"], after["recompiles"]) == (before["compiles"], before["recompiles"])


def test_architecture_steps_run_eagerly_where_weight_steps_are_compiled(tmp_path):
    """A compiled per-op graph's backward returns every input's gradient, the weights' too: the architecture
    step runs the ops eagerly, so it compiles nothing and autograd computes the logits' gradient alone. Its
    result is the eager engine's, bit for bit."""
    comp, eager = _trainer(tmp_path, "c", "compile=on"), _trainer(tmp_path, "e", "compile=off")
    comp.steps.prepare("search")  # the mixed ops now route through compiled per-op graphs
    count = lambda: {k: v for k, v in comp.steps.monitor.totals().items() if k != "compile_s"}  # noqa: E731
    before = count()  # the counts are the process's: earlier tests compiled too
    (x, y), = _batches(comp, "arch", 1)
    results = [t.steps.arch_step(x, y, "search") for t in (comp, eager)]
    assert count() == before  # neither a compile nor a recompile
    assert results[0].loss == results[1].loss
    for a, b in zip(comp.arch.parameters(), eager.arch.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("compile_", ["off", "on"])
def test_an_architecture_step_computes_no_weight_gradient(tmp_path, compile_):
    """The architecture step asks autograd for the logits' gradient alone: no weight's gradient is computed (a
    hook on every weight never fires) and no weight's .grad is read or written (the weight step's gradients
    are left as they were, the very tensors). `loss.backward()` in its place fails both."""
    t = _trainer(tmp_path, compile_, f"compile={compile_}")
    t.steps.prepare("search")
    (x, y), = _batches(t, "train", 1)
    (xa, ya), = _batches(t, "arch", 1)
    t.steps.weight_step(x, y, "search")  # leaves the sampled ops' gradients in .grad
    before = {p: (p.grad, None if p.grad is None else p.grad.clone()) for p in t.net.parameters()}
    assert any(g is not None for g, _ in before.values())
    fired = []
    hooks = [p.register_hook(lambda g, name=name: fired.append(name)) for name, p in t.net.named_parameters()]
    try:
        r = t.steps.arch_step(xa, ya, "search")
    finally:
        for h in hooks:
            h.remove()
    assert not r.skipped and fired == [], f"weight gradients computed by the architecture step: {fired[:5]}"
    for p, (grad, copy) in before.items():
        assert p.grad is grad and (grad is None or torch.equal(grad, copy))
    assert all(p.grad is None for p in t.arch.parameters())  # and the logits' own is consumed, not left


@pytest.mark.cuda
def test_a_prefetched_sample_reaches_pinned_memory_behind_an_event(tmp_path):
    from engine.hostreads import HostReads
    t = _trainer(tmp_path, "p", "compile=off", "device=cuda")
    (x, y), = _batches(t, "train", 1)
    (xa, ya), = _batches(t, "arch", 1)
    t.steps.prefetch("search", [(False, 1.0, 0.0), (True, 1.0, 0.0)])
    transfer = t.arch._drawn[0].transfer
    assert transfer.host.is_pinned() and transfer.host.device.type == "cpu" and transfer.event is not None
    with HostReads() as reads:
        t.steps.weight_step(x, y, "search")
        t.steps.arch_step(xa, ya, "search")
    assert reads.count == 1, reads.report()
