"""Mixed op, supernet and derived network: what runs, what it computes, and where gradients go."""
from __future__ import annotations

import pytest
import torch

from engine.arch import Architecture
from engine.genotype import CELL_TYPES, NONE, SKIP, Genotype
from engine.mixed import MixedOp
from engine.network import NetSpec, Network, SearchCell, count_parameters, darts_spec, derive
from engine.ops import PRIMITIVES


def _net(c=4, layers=3, size=12, in_ch=1, **kw):
    torch.manual_seed(0)
    spec = darts_spec(in_ch, 10, c=c, layers=layers, **kw)
    return Network(spec), torch.randn(4, in_ch, size, size)


def _count_op_calls(net: Network) -> dict:
    """Forward-hook counter per (cell, edge, op index)."""
    calls = {}
    for ci, cell in enumerate(net.cells):
        for e, edge in enumerate(cell.edges):
            for k, op in enumerate(edge.ops):
                def hook(mod, inp, out, key=(ci, e, k)):
                    calls[key] = calls.get(key, 0) + 1
                op.register_forward_hook(hook)
    return calls


def test_layout_reductions_and_wiring():
    spec = darts_spec(3, 10, c=8, layers=8)
    assert [c.reduction for c in spec.cells] == [False, False, True, False, False, True, False, False]
    assert [c.c for c in spec.cells] == [8, 8, 16, 16, 16, 32, 32, 32]
    assert spec.cells[0].inputs == (0, 0) and spec.cells[3].inputs == (2, 3) and spec.cells[3].output == 4
    assert NetSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize("size,in_ch", [(28, 1), (32, 3), (13, 1)])
def test_supernet_runs_in_every_phase(size, in_ch):
    net, x = _net(size=size, in_ch=in_ch)
    arch = Architecture()
    for phase in ("warmup", "search", "derive"):
        out = net(x, arch.sample(phase))
        assert out.shape == (4, 10) and torch.isfinite(out).all()


def test_warmup_runs_only_skip_and_no_gradient_reaches_the_logits():
    net, x = _net()
    arch = Architecture()
    calls = _count_op_calls(net)
    net(x, arch.sample("warmup")).sum().backward()
    assert calls and all(k == SKIP for (_, _, k) in calls)
    assert all(n == 1 for n in calls.values()) and len(calls) == 3 * 14
    assert all(p.grad is None for p in arch.parameters())


def _open_gates(net: Network) -> None:
    """Ops that warmup does not train start silent (final BN scale 0, so zero architecture gradient too);
    open them as training would."""
    from engine.ops import PRIMITIVES, final_batchnorm
    for cell in net.cells:
        for edge in cell.edges:
            for name, op in zip(PRIMITIVES, edge.ops):
                bn = final_batchnorm(op)
                if name not in ("none", "skip_connect") and bn is not None:
                    torch.nn.init.ones_(bn.weight)


def test_untrained_ops_start_silent():
    net, x = _net()
    edge = net.cells[0].edges[0]
    y = torch.randn(2, 4, 6, 6)
    for name, op in zip(PRIMITIVES, edge.ops):
        out = op(y)
        if name == "skip_connect":
            assert out is y
        else:
            assert (out == 0).all(), f"{name} is not silent at init"


def test_hard_mode_runs_exactly_the_sampled_op_and_every_logit_gets_a_gradient():
    net, x = _net()
    _open_gates(net)
    arch = Architecture(seed=2)
    arch.tau = 1.0
    calls = _count_op_calls(net)
    sample = arch.sample("search", grad=True, generator=torch.Generator().manual_seed(3))
    net(x, sample).logsumexp(1).sum().backward()
    for ci, cell in enumerate(net.cells):
        chosen = sample[cell.spec.cell_type].weights.detach().argmax(1).tolist()
        for e in range(14):
            ran = {k: n for (c, ee, k), n in calls.items() if c == ci and ee == e}
            if chosen[e] == NONE:
                assert ran == {}  # `none` is never computed: its output is zero
            else:
                assert ran == {chosen[e]: 1}, f"cell {ci} edge {e} ran {ran}, sampled {chosen[e]}"
    for t in CELL_TYPES:
        g = arch.logits[t].grad
        assert torch.isfinite(g).all()
        for e, k in enumerate(sample[t].weights.detach().argmax(1).tolist()):
            if k != NONE:
                assert (g[e] != 0).all(), f"{t} edge {e}: a logit got no gradient"


def test_ops_below_skip_threshold_never_run():
    net, x = _net()
    arch = Architecture(hard=False, skip_threshold=0.12, dominant_threshold=1.0)
    arch.tau = 1.0
    calls = _count_op_calls(net)
    sample = arch.sample("search", grad=True, generator=torch.Generator().manual_seed(5))
    net(x, sample)
    for ci, cell in enumerate(net.cells):
        w = sample[cell.spec.cell_type].weights.detach()
        for e in range(14):
            ran = {k for (c, ee, k) in calls if c == ci and ee == e}
            expected = {k for k in range(8) if w[e, k] > 0.12 and k != NONE}
            assert ran == expected
            assert all(w[e, k] <= 0.12 for k in set(range(8)) - ran - {NONE})


def test_thresholds_zero_give_the_dense_darts_sum():
    net, x = _net()
    net = net.double()
    x = x.double()
    arch = Architecture(hard=False, skip_threshold=0.0, dominant_threshold=1.0).double()
    sample = arch.sample("search", grad=True, generator=torch.Generator().manual_seed(1))
    skipped = net(x, sample)
    dense = net(x, dense={t: sample[t].weights for t in CELL_TYPES})
    diff = (skipped - dense).abs()
    assert diff.max() < 1e-6, f"max {diff.max():.3g}, mean {diff.mean():.3g}"
    # and in float32 at the same tolerance relative to the output scale
    net32, x32 = net.float(), x.float()
    s32 = {t: type(sample[t])(sample[t].weights.float(), sample[t].active) for t in CELL_TYPES}
    d = (net32(x32, s32) - net32(x32, dense={t: s32[t].weights for t in CELL_TYPES})).abs().max()
    assert d < 1e-5


def test_mixed_op_alone_matches_the_dense_sum_and_its_gradients():
    op = MixedOp(5, 1).double()
    x = torch.randn(2, 5, 7, 7, dtype=torch.float64)
    w = torch.softmax(torch.randn(8, dtype=torch.float64), 0).requires_grad_()
    active = tuple(k for k in range(8) if k != NONE)
    a = op(x, w, active)
    ga = torch.autograd.grad(a.square().sum(), w)[0]
    b = op.dense(x, w)
    gb = torch.autograd.grad(b.square().sum(), w)[0]
    assert (a - b).abs().max() < 1e-12 and (ga - gb).abs().max() < 1e-10
    assert op(x, w, ()) is None


def test_nan_in_the_logits_leaves_the_output_finite():
    net, x = _net()
    arch = Architecture()
    with torch.no_grad():
        arch.logits["normal"][:, 4] = float("nan")
    out = net(x, arch.sample("search", grad=True))
    assert torch.isfinite(out).all() and arch.state.nan_events == 14
    out.sum().backward()
    assert torch.isfinite(arch.logits["reduce"].grad).all()


def test_derived_network_forward_backward_and_weight_transfer():
    net, x = _net(layers=4)
    arch = Architecture(seed=4)
    g = arch.genotype()
    derived = derive(net, g)
    assert count_parameters(derived) < count_parameters(net)
    out = derived(x)
    out.sum().backward()
    assert all(p.grad is not None for p in derived.parameters())
    # the transferred network computes what the supernet computes at the genotype (eval mode: same BN stats)
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    derived = derive(net, g, open_gates=False)
    net.eval(), derived.eval()
    with torch.no_grad():
        diff = (net(x, arch.sample("derive")) - derived(x)).abs().max()
    assert diff < 1e-5, f"max diff {diff:.3g}"
    # by default the gated ops' output scales restart at 1, the only change from the supernet's function
    opened = derive(net, g).eval()
    changed = [n for n, p in opened.state_dict().items()
               if not torch.equal(p, derived.state_dict()[n])]
    assert changed and all(n.endswith(".weight") for n in changed), changed
    assert all(bool((opened.state_dict()[n] == 1).all()) for n in changed)
    fresh = derive(net, g, transfer=False)
    assert not torch.equal(fresh.stem[0].weight, net.stem[0].weight)


def test_derived_network_at_another_width():
    net, x = _net(layers=4)
    g = Architecture(seed=4).genotype()
    narrow = derive(net, g, transfer=False)
    wide = derive(net, g, transfer=False, channels=2 * net.spec.cells[0].c)
    assert wide.spec.stem_channels == 2 * net.spec.stem_channels
    assert [c.c for c in wide.spec.cells] == [2 * c.c for c in net.spec.cells]
    assert [(c.inputs, c.output, c.reduction) for c in wide.spec.cells] == \
        [(c.inputs, c.output, c.reduction) for c in net.spec.cells]
    assert count_parameters(wide) > 2 * count_parameters(narrow)
    assert wide(x).shape == narrow(x).shape
    with pytest.raises(ValueError, match="width"):
        derive(net, g, transfer=True, channels=2 * net.spec.cells[0].c)


def test_drop_path_only_in_training():
    net, x = _net()
    derived = derive(net, Genotype.from_json({"normal": [["sep_conv_3x3", 0]] * 8, "normal_concat": [2, 3, 4, 5],
                                              "reduce": [["max_pool_3x3", 0]] * 8, "reduce_concat": [2, 3, 4, 5]}),
                     transfer=False)
    derived.set_drop_path(0.5)
    derived.eval()
    with torch.no_grad():
        assert torch.equal(derived(x), derived(x))
    derived.train()
    torch.manual_seed(0)
    a = derived(x)
    torch.manual_seed(1)
    assert not torch.equal(a, derived(x))


def test_every_cell_is_a_search_cell_with_fourteen_mixed_edges():
    net, _ = _net()
    assert all(isinstance(c, SearchCell) and len(c.edges) == 14 for c in net.cells)
    assert all(len(e.ops) == len(PRIMITIVES) for c in net.cells for e in c.edges)


def test_a_node_may_read_one_state_twice():
    """DARTS allows both inputs of a node from the same state (hand-written genotypes do): both ops are built,
    both are summed, and supernet weights transfer to both (edges used to be keyed by state: one was lost)."""
    from engine.ops import Identity, SepConv
    net, x = _net()
    pairs = [["sep_conv_3x3", 0], ["skip_connect", 0], ["sep_conv_3x3", 0], ["sep_conv_3x3", 1],
             ["dil_conv_3x3", 1], ["dil_conv_3x3", 1], ["max_pool_3x3", 2], ["skip_connect", 3]]
    g = Genotype.from_json({"normal": pairs, "normal_concat": [2, 3, 4, 5], "reduce": pairs, "reduce_concat": [2, 3, 4, 5]})
    derived = derive(net, g, transfer=True, open_gates=False).eval()
    cell = derived.cells[0]
    assert len(cell.edges) == 8 and isinstance(cell.edges[cell.keys[0]], SepConv)
    assert isinstance(cell.edges[cell.keys[1]], Identity) and cell.keys[4] != cell.keys[5]
    k = PRIMITIVES.index("dil_conv_3x3")
    for key in cell.keys[4:6]:  # both twins start from the supernet's one edge (node 2, state 1)
        assert torch.equal(cell.edges[key][1].weight, net.cells[0].edges[int(key.split("_")[0])].ops[k][1].weight)
    seen = {}
    cell.register_forward_hook(lambda mod, inp, out: seen.update(inp=inp, out=out))
    with torch.no_grad():
        derived(x)
        s0, s1 = seen["inp"][:2]
        states = [cell.pre0(s0), cell.pre1(s1)]
        node0 = cell.edges[cell.keys[0]](states[0]) + states[0]
    c = node0.shape[1]
    assert torch.allclose(seen["out"][:, :c], node0, atol=1e-6)


def test_an_ungated_supernet_keeps_the_darts_ops_and_its_spec_says_so():
    """gate_ops=false (config) -> NetSpec.gated False: every op's output BatchNorm is DARTS's non-affine one, so a
    sampled op trains from its first step; the spec carries the choice through checkpoints and growth, and a
    spec written before the field existed reads as gated (what those supernets were)."""
    from engine.ops import final_batchnorm
    gated, plain = (Network(darts_spec(1, 10, 4, 3, gated=g)) for g in (True, False))
    for net, want_affine in ((gated, True), (plain, False)):
        edge = net.cells[0].edges[0]
        for name, op in zip(PRIMITIVES, edge.ops):
            bn = final_batchnorm(op)
            if bn is None or name == "skip_connect":
                continue
            assert bn.affine is want_affine, (name, want_affine)
            if want_affine:
                assert torch.all(bn.weight == 0)   # silent until it learns
    assert NetSpec.from_json(plain.spec.to_json()).gated is False
    old = gated.spec.to_json()
    del old["gated"]
    assert NetSpec.from_json(old).gated is True
    # and the ungated supernet's sampled op is not silent: its output is not all zeros
    x = torch.randn(4, 1, 12, 12)
    arch = Architecture(nodes=4)
    w = arch._one_hot([PRIMITIVES.index("sep_conv_3x3")] * arch.edges, "normal")
    sample = {"normal": w, "reduce": arch._one_hot([PRIMITIVES.index("sep_conv_3x3")] * arch.edges, "reduce")}
    cell_out = [plain.cells[0](plain.stem(x), plain.stem(x), sample["normal"]),
                gated.cells[0](gated.stem(x), gated.stem(x), sample["normal"])]
    assert cell_out[0].abs().sum() > 0 and cell_out[1].abs().sum() == 0
