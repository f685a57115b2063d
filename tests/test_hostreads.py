"""Host reads: the places a GPU step would make the host wait, counted on CPU tensors (engine/hostreads.py).

The CUDA policy's choices (`sync_free`: fused optimizers whose skip is decided on the device, sums kept on the
device) run here on the CPU, so the budget of issue 14 is held by the CPU suite: no read in a warmup or
optimize weight step; one per search/growth iteration (the routing of its weight step's and architecture
step's samples, both cell types, drawn together and transferred once); one per step called on its own; over
a whole smoke search at most 2 per optimizer step, evaluation and bookkeeping included."""
from __future__ import annotations

import pytest
import torch

import engine.steps as steps_module
from engine.config import preset
from engine.data import Cycle
from engine.hostreads import HostReads
from engine.steps import Steps
from engine.trainer import Trainer

from .conftest import quiet


@pytest.fixture
def sync_free(monkeypatch):
    """The CUDA policy's step choices on CPU tensors."""
    real = steps_module.resolve_policy
    monkeypatch.setattr(steps_module, "resolve_policy", lambda setting, device: {**real(setting, device),
                                                                                  "sync_free": True})


def test_the_counter_catches_every_kind_of_read():
    t = torch.arange(6.0)
    tolist, cpu, to = torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.to
    with HostReads() as reads:
        float(t.sum()), int(t[0]), bool(t[1] > 0), t.tolist(), t.numpy(), t[t > 2], t.nonzero(), torch.equal(t, t)
    assert reads.count == 8, reads.report()  # one each
    # on a GPU each of these waits for the device; on the CPU they return the tensor itself and dispatch nothing
    loss = t.sum()
    with HostReads() as reads:
        loss.detach().cpu(), loss.to("cpu"), t.to(device="cpu"), t.to("cpu", torch.float64)
    assert reads.count == 4, reads.report()
    with HostReads() as reads:
        (t * 2 + 1).sum().exp()  # device work only
        t.to(torch.float64), t.to("cpu", non_blocking=True), t.to(memory_format=torch.contiguous_format)
        t.to(torch.device("cpu")), t.to(t)  # moves to the compute device (the CPU here), as loaders and torch do
    assert reads.count == 0, reads.report()
    assert torch.Tensor.tolist is tolist and torch.Tensor.cpu is cpu and torch.Tensor.to is to  # wrappers gone


def test_step_reads_per_phase(tmp_path, sync_free):
    trainer = Trainer(preset("smoke"), str(tmp_path / "run"), log=quiet)
    steps = trainer.steps
    assert steps.sync_free
    train, val = Cycle(trainer.loaders["train"]), Cycle(trainer.loaders["arch"])
    counts = {}
    for phase in ("warmup", "search", "growth"):
        steps.weight_step(*next(train), phase)  # first steps create optimizer state
        with HostReads() as reads:
            steps.weight_step(*next(train), phase)
        counts[f"{phase} weight"] = reads
        if phase != "warmup":
            steps.arch_step(*next(val), phase)
            with HostReads() as reads:
                steps.arch_step(*next(val), phase)
            counts[f"{phase} arch"] = reads
    want = {"warmup weight": 0, "search weight": 1, "search arch": 1, "growth weight": 1, "growth arch": 1}
    assert {k: r.count for k, r in counts.items()} == want, {k: r.report() for k, r in counts.items()}
    assert all("arch.py" in site for r in counts.values() for site in r.sites)  # the sample's routing read


@pytest.mark.parametrize("phase, cost", [("search", []), ("growth", []), ("search", ["cost=macs", "cost_target=1"])])
def test_a_search_iteration_reads_once(tmp_path, sync_free, phase, cost):
    """With a cost term too: the derived genotype's cost is computed on the device (engine/cost.py)."""
    trainer = Trainer(preset("smoke").override(cost), str(tmp_path / "run"), log=quiet)
    steps, arch = trainer.steps, trainer.arch
    train, val = Cycle(trainer.loaders["train"]), Cycle(trainer.loaders["arch"])
    steps.weight_step(*next(train), phase)  # optimizer state
    steps.arch_step(*next(val), phase)
    (x, y), (xa, ya) = next(train), next(val)
    with HostReads() as reads:  # what the loop does each iteration (engine/loop.py PhaseLoop.prefetch)
        steps.prefetch(phase, [(False, arch.tau, 1.0), (True, 0.9 * arch.tau, 0.5)])
        assert arch.pending == 2
        steps.weight_step(x, y, phase)
        steps.arch_step(xa, ya, phase)
    assert reads.count == 1 and arch.pending == 0, reads.report()
    assert all("arch.py" in site for site in reads.sites)


def test_optimize_weight_step_reads_nothing(tmp_path, sync_free):
    trainer = Trainer(preset("smoke"), str(tmp_path / "run"), log=quiet)
    final = trainer.run_state.build_final(trainer.arch.genotype())
    batches = Cycle(trainer.run_state.loaders["optimize"])
    final.steps.weight_step(*next(batches))
    with HostReads() as reads:
        r = final.steps.weight_step(*next(batches))
    assert reads.count == 0, reads.report()
    assert not r.skipped


def test_a_non_finite_step_is_skipped_on_the_device(tmp_path, sync_free, monkeypatch):
    trainer = Trainer(preset("smoke"), str(tmp_path / "run"), log=quiet)
    steps = trainer.steps
    train, val = Cycle(trainer.loaders["train"]), Cycle(trainer.loaders["arch"])
    steps.weight_step(*next(train), "search")
    steps.arch_step(*next(val), "search")
    weights = {k: v.clone() for k, v in trainer.net.state_dict().items() if "running" not in k and "num_b" not in k}
    state = {id(p): {k: v.clone() if torch.is_tensor(v) else v for k, v in s.items()}
             for opt in (steps.weight_opt, steps.arch_opt) for p, s in opt.state.items()}
    logits = [p.detach().clone() for p in trainer.arch.parameters()]
    moments, counted = trainer.arch.state.grad_outer.clone(), int(trainer.arch.state.grad_steps)
    real = Steps.criterion
    monkeypatch.setattr(Steps, "criterion", lambda self, out, y: real(self, out, y) * float("nan"))
    with HostReads() as reads:
        r, ra = steps.weight_step(*next(train), "search"), steps.arch_step(*next(val), "search")
    assert reads.count == 2, reads.report()  # the two samples' routing, nothing to decide the skip
    assert r.skipped and ra.skipped
    now = trainer.net.state_dict()
    assert all(torch.equal(v, now[k]) for k, v in weights.items())
    assert all(torch.equal(a, b) for a, b in zip(logits, trainer.arch.parameters()))
    assert torch.equal(moments, trainer.arch.state.grad_outer) and int(trainer.arch.state.grad_steps) == counted
    for opt in (steps.weight_opt, steps.arch_opt):  # momentum, Adam moments and step counts untouched
        for p, s in opt.state.items():
            assert all(torch.equal(v, s[k]) if torch.is_tensor(v) else v == s[k] for k, v in state[id(p)].items())


def test_a_whole_smoke_search_reads_at_most_twice_per_optimizer_step(tmp_path, sync_free, monkeypatch):
    calls = {"weight": 0, "arch": 0}
    for name in ("weight", "arch"):
        real = getattr(Steps, f"{name}_step")

        def counted(self, *a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(self, *a, **k)
        monkeypatch.setattr(Steps, f"{name}_step", counted)
    trainer = Trainer(preset("smoke"), str(tmp_path / "run"), log=quiet)
    with HostReads() as reads:
        final = trainer.run()
    optimizer_steps = calls["weight"] + calls["arch"]
    assert calls["arch"] == final["arch_steps"] > 0 and calls["weight"] > final["steps"] > 0  # optimize counted too
    print(f"\nwhole smoke search: {reads.count} host reads, {optimizer_steps} optimizer steps ({calls}); "
          f"{reads.report(12)}")
    assert reads.count <= 2 * optimizer_steps, reads.report(20)
    # the samples' routing: one read per search or growth iteration (final["steps"]: the supernet's weight
    # steps, warmup's included, which read nothing)
    routing = sum(n for site, n in reads.sites.items() if "(rows)" in site)
    assert 0 < routing <= final["steps"] - len(trainer.run_state.loaders["train"]), reads.report(20)
