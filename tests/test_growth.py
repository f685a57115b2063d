"""Growth: function preservation (depth at several positions, width x1.5 and x2, 28x28 and 32x32), the loss
across an event, optimizer state, controlled recompilation, checkpoints and resume after growth."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from engine.arch import Architecture
from engine.config import preset
from engine.errors import TrainingError
from engine.net2net import (choose_depth_position, grow_depth, grow_width, transfer_optimizer_state, widen_map)
from engine.network import Network, darts_spec
from engine.trainer import Trainer
from .conftest import untimed


def _supernet(size, ch, c=4, layers=5):
    torch.manual_seed(0)
    net = Network(darts_spec(ch, 10, c, layers)).to(memory_format=torch.channels_last)
    # trained-looking state: BN statistics, affine parameters and op gates away from their init
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            if m.affine:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-0.2, 0.2)
    x = torch.randn(6, ch, size, size).contiguous(memory_format=torch.channels_last)
    return net, x


def _out(net, x, sample):
    net.eval()
    with torch.no_grad():
        return net(x, sample)


@pytest.mark.parametrize("size,ch", [(28, 1), (32, 3)])
def test_depth_growth_preserves_the_function_at_every_position(size, ch):
    net, x = _supernet(size, ch)
    sample = Architecture(seed=1).sample("argmax")
    ref = _out(net, x, sample)
    for position in range(1, len(net.spec.cells) + 1):
        grown = grow_depth(copy.deepcopy(net), position)
        assert len(grown.cells) == 6 and grown.spec.cells[position].residual
        diff = (_out(grown, x, sample) - ref).abs().max()
        assert diff < 1e-5, f"depth at {position}: max diff {diff:.3g}"
    # the new cell then learns: its scale gets a gradient at once
    grown = grow_depth(copy.deepcopy(net), 3)
    grown.train()
    grown(x, sample).square().mean().backward()
    assert grown.cells[3].scale.grad.abs().sum() > 0


@pytest.mark.parametrize("size,ch", [(28, 1), (32, 3)])
@pytest.mark.parametrize("factor", [1.5, 2.0])
def test_width_growth_preserves_the_function(size, ch, factor):
    net, x = _supernet(size, ch)
    grow_depth(net, 2)  # a residual cell too: it must follow its state's channel layout
    with torch.no_grad():
        net.cells[2].scale.uniform_(0.5, 1.5)  # as after training: the residual cell's output counts
    for sample in (Architecture(seed=2).sample("argmax"), Architecture(seed=3).sample("warmup")):
        ref = _out(net, x, sample)
        wide, _ = grow_width(net, factor)
        assert wide.spec.cells[0].c == {1.5: 6, 2.0: 8}[factor]
        diff = (_out(wide, x, sample) - ref).abs().max()
        assert diff < 1e-5, f"x{factor}: max diff {diff:.3g}"
        # train mode too: replicated channels have identical batch statistics
        net.train()
        wide.train()
        with torch.no_grad():
            assert (wide(x, sample) - net(x, sample)).abs().max() < 1e-4


def test_widen_map_keeps_halves_and_counts():
    g = widen_map(4, 6)
    assert g.tolist() == [0, 1, 0, 2, 3, 2]
    assert widen_map(6, 12).tolist()[:6] == [0, 1, 2, 0, 1, 2]


def test_optimizer_state_follows_the_parameters():
    net, x = _supernet(12, 1, layers=3)
    arch = Architecture()
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    net.train()
    net(x, arch.sample("warmup")).square().mean().backward()
    opt.step()
    wide, transforms = grow_width(net, 1.5)
    new_opt = torch.optim.SGD(wide.parameters(), lr=0.1, momentum=0.9)
    transfer_optimizer_state(opt, new_opt, transforms)
    # the stem is unchanged: its momentum is copied as it was
    assert torch.equal(new_opt.state[wide.stem[0].weight]["momentum_buffer"], opt.state[net.stem[0].weight]["momentum_buffer"])
    # a widened tensor: momentum transformed like the weight (replicated, divided for consumers)
    for old, new, fn in transforms:
        if old is net.classifier.weight:
            assert torch.allclose(new_opt.state[new]["momentum_buffer"], fn(opt.state[old]["momentum_buffer"]))
    # depth growth: existing tensors keep their state, the new cell's start empty
    deep = grow_depth(net, 1)
    deep_opt = torch.optim.SGD(deep.parameters(), lr=0.1, momentum=0.9)
    transfer_optimizer_state(opt, deep_opt)
    assert all(p not in deep_opt.state for p in deep.cells[1].parameters())
    assert deep.stem[0].weight in deep_opt.state


def test_momentum_after_widening_by_hand_and_in_function():
    """An oracle that does not use the transforms: each wide classifier column is an old column divided by its
    number of copies (the mapping read off the weights themselves), and its momentum must be that old column's
    momentum divided the same way. Then in function: a step driven by momentum and weight decay alone (zero
    gradients) moves the grown network exactly as it moves the original, if and only if the momentum followed
    the weights (undivided or dropped momentum moves the two apart)."""
    net, x = _supernet(12, 1, layers=3)
    sample = Architecture().sample("warmup")
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    net.train()
    for _ in range(2):
        opt.zero_grad()
        net(x, sample).square().mean().backward()
        opt.step()
    wide, transforms = grow_width(net, 1.5)
    new_opt = torch.optim.SGD(wide.parameters(), lr=0.1, momentum=0.9, weight_decay=3e-4)
    transfer_optimizer_state(opt, new_opt, transforms)

    w, wn = net.classifier.weight.detach(), wide.classifier.weight.detach()          # (10, C), (10, C')
    m, mn = opt.state[net.classifier.weight]["momentum_buffer"], new_opt.state[wide.classifier.weight]["momentum_buffer"]
    assert wn.shape[1] > w.shape[1]
    # the old column each wide column copies: the one it is parallel to
    cos = torch.nn.functional.normalize(wn.T, dim=1) @ torch.nn.functional.normalize(w.T, dim=1).T   # (C', C)
    source = cos.argmax(1)
    assert torch.allclose(cos.max(1).values, torch.ones(len(source)), atol=1e-5)
    copies = torch.bincount(source, minlength=w.shape[1]).float()
    assert torch.allclose(wn, w[:, source] / copies[source], atol=1e-6)
    assert torch.allclose(mn, m[:, source] / copies[source], atol=1e-6)

    def eval_out(model):
        model.eval()
        with torch.no_grad():
            out = model(x, sample)
        model.train()
        return out
    before = eval_out(net)
    assert torch.allclose(eval_out(wide), before, atol=1e-4)
    for o, model in ((opt, net), (new_opt, wide)):
        for p in model.parameters():
            p.grad = torch.zeros_like(p)   # the step is momentum and weight decay alone
        o.step()
    after = eval_out(net)
    assert (after - before).abs().max() > 1e-2  # the step moved the function ...
    assert torch.allclose(eval_out(wide), after, atol=1e-4)  # ... and the grown network's with it


def test_depth_position_policy():
    spec = darts_spec(1, 10, 4, 5)  # cells 0..4, reductions at 1 and 3: stages [0], [1, 2], [3, 4]
    assert choose_depth_position(spec) == 1


def _trainer(tmp_path, *overrides, name="run"):
    cfg = preset("smoke").override(["optimize_epochs=0", "search_epochs=1", "growth_epochs=2",
                                    "grow_kinds=depth,width", "grow_every=1"] + list(overrides))
    return Trainer(cfg, str(tmp_path / name), log=lambda *_: None)


def test_loss_across_an_event_is_continuous(tmp_path):
    """The loss the first training step after an event starts from (train mode, same batch, same
    architecture) is within 1% of the loss before the event."""
    t = _trainer(tmp_path)
    x, y = next(iter(t.loaders["train"]))
    sample = t.arch.sample("argmax")

    def train_loss():
        t.net.train()
        with torch.no_grad(), t.steps.eager():
            return float(t.steps.criterion(t.net(t.steps._input(x), sample), y))

    for kind in ("depth", "width"):
        before = train_loss()
        event = t.grow(kind)
        after = train_loss()
        assert abs(after - before) <= 0.01 * before, (kind, before, after)
        assert event["max_abs_diff"] < 1e-5 and event["params_after"] > event["params_before"]
        assert not t.steps.weight_step(x, y, "growth").skipped  # the grown network trains


def test_an_event_that_changes_the_function_stops_with_a_clear_error(tmp_path, monkeypatch):
    import engine.growth as growth
    t = _trainer(tmp_path)
    real = growth.grow_width

    def broken(net, factor):  # a widening that is off by a little: what a bug in it would look like
        wide, transforms = real(net, factor)
        with torch.no_grad():
            wide.classifier.bias.add_(1e-3)
        return wide, transforms

    monkeypatch.setattr(growth, "grow_width", broken)
    net = t.net
    with pytest.raises(TrainingError, match="growth event width changed the network.s output"):
        t.grow("width")
    assert t.net is net  # nothing adopted


@pytest.mark.parametrize("kind", ["depth", "width"])
def test_a_failed_event_leaves_network_and_optimizer_untouched(tmp_path, monkeypatch, kind):
    """growth.grow is a transform: on failure (here a grown network that is off by a little) the network it
    was given keeps its cells, spec, weights, mode and optimizer state; on success they are unchanged too."""
    import engine.growth as growth
    t = _trainer(tmp_path)
    x, y = next(iter(t.loaders["train"]))
    t.steps.weight_step(x, y, "search")  # optimizer state (momentum) to carry
    net, opt = t.net, t.weight_opt
    spec, cells = net.spec, len(net.cells)
    weights = {k: v.clone() for k, v in net.state_dict().items()}
    momentum = {id(p): opt.state[p]["momentum_buffer"].clone() for p in net.parameters() if p in opt.state}
    real = getattr(growth, f"grow_{kind}")

    def broken(n, arg):
        grown = real(n, arg)
        wide = grown[0] if isinstance(grown, tuple) else grown
        with torch.no_grad():
            wide.classifier.bias.add_(1e-3)
        return grown

    def untouched():
        assert net.spec == spec and len(net.cells) == cells and net.training
        assert all(torch.equal(v, net.state_dict()[k]) for k, v in weights.items())
        assert all(torch.equal(opt.state[p]["momentum_buffer"], momentum[id(p)]) for p in net.parameters()
                   if p in opt.state) and len(momentum) == len(opt.state)

    with monkeypatch.context() as m:
        m.setattr(growth, f"grow_{kind}", broken)
        with pytest.raises(TrainingError, match=f"growth event {kind}"):
            growth.grow(net, opt, t.arch, t.probe_batch(), kind, width_factor=1.5)
    untouched()
    grown = growth.grow(net, opt, t.arch, t.probe_batch(), kind, width_factor=1.5)
    untouched()
    assert grown.net is not net and grown.opt is not opt and grown.event["params_after"] > grown.event["params_before"]
    assert len(grown.opt.state) == len(opt.state)  # every momentum buffer moved onto the grown parameters


def test_smoke_search_with_growth_writes_event_records(tmp_path):
    t = _trainer(tmp_path)
    t.run()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    events = [r for r in records if "event" in r]
    assert [e["event"] for e in events] == ["grow_depth", "grow_width"]
    for e in events:
        for key in ("params_before", "params_after", "max_abs_diff", "grow_s", "recompile_s", "recompiles"):
            assert key in e
        assert e["max_abs_diff"] <= 1e-4
    growth = [r for r in records if r.get("phase") == "growth" and "event" not in r]
    assert growth[-1]["cells"] == 4 and growth[-1]["channels"] == 6


def test_checkpoint_after_growth_loads_with_identical_outputs_and_resume_works(tmp_path):
    t = _trainer(tmp_path, name="a")
    t.stop_after = 3  # warmup, search, and the first growth epoch (which began with the depth event)
    assert t.run() is None
    probe = t.probe_batch()
    sample = t.arch.sample("argmax")
    ref = _out(t.net, probe, sample)
    resumed = Trainer(t.cfg, str(tmp_path / "a"), resume=True, log=lambda *_: None)
    assert len(resumed.net.cells) == 4 and resumed.net.spec == t.net.spec
    assert torch.equal(_out(resumed.net, probe, sample), ref)
    resumed.run()
    full = _trainer(tmp_path, name="b")
    full.run()

    def records(path):
        return untimed([json.loads(line) for line in path.read_text().splitlines()])
    assert records(tmp_path / "a" / "metrics.jsonl") == records(tmp_path / "b" / "metrics.jsonl")


@pytest.mark.slow
def test_recompiles_after_an_event_equal_the_step_graphs_then_zero(tmp_path):
    t = _trainer(tmp_path, "compile=on", "synthetic_size=8", "layers=1", "channels=4", "stem_multiplier=1",
                 "batch_size=16")
    steps = t.steps
    x, y = next(iter(t.loaders["train"]))
    steps.precompile(x, y, "growth")
    graphs = {g for g in steps.monitor.graphs if g.startswith("op:")}
    event = t.grow("width")
    assert event["recompiles"] == len(graphs) and event["recompile_s"] > 0
    mon = t.steps.monitor
    before = mon.totals()
    batches = iter(t.loaders["train"])
    arch = iter(t.loaders["arch"])
    for _ in range(4):
        t.steps.weight_step(*next(batches), "growth")
        t.steps.arch_step(*next(arch), "growth")
    assert mon.totals()["recompiles"] == before["recompiles"] and mon.totals()["compiles"] == before["compiles"]
