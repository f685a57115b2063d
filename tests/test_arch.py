"""Architecture manager: init, phase policy, Gumbel sampling, NaN fallback, temperature, genotype."""
from __future__ import annotations

import json
import math

import pytest
import torch

from engine.arch import Architecture, parse_logit_prior, temperature
from engine.genotype import CELL_TYPES, NONE, SKIP, Genotype, edge_index, num_edges
from engine.errors import ConfigError
from engine.ops import PRIMITIVES


def test_edges_of_a_darts_cell():
    assert num_edges(4) == 14
    assert [edge_index(n, 0) for n in range(4)] == [0, 2, 5, 9]
    assert edge_index(3, 4) == 13


def test_init_keeps_none_down_and_skip_up():
    for seed in range(20):
        arch = Architecture(seed=seed)
        for t in CELL_TYPES:
            p = arch.probabilities(t)
            assert p[:, NONE].max() < 0.03, f"seed {seed}: none has probability {p[:, NONE].max():.3f}"
    # expected probability over the init distribution: skip_connect is the most likely op on every edge
    expected = torch.stack([Architecture(seed=s).probabilities("normal") for s in range(300)]).mean(0)
    assert (expected.argmax(1) == SKIP).all()
    assert expected[:, NONE].max() < 0.03


def test_init_values_are_configurable():
    arch = Architecture(init_std=0.0, none_init=-5.0, skip_init=3.0)
    row = arch.logits["normal"][0].tolist()
    assert row[NONE] == -5.0 and row[SKIP] == 3.0 and row[1] == 0.0


def test_logit_prior_adds_to_the_named_cell_types_only():
    prior = parse_logit_prior("reduce:max_pool_3x3=2,sep_conv_5x5=-1; normal:skip_connect=0.5")
    assert prior == {"reduce": {1: 2.0, 5: -1.0}, "normal": {3: 0.5}}
    assert parse_logit_prior("dil_conv_3x3=1") == {t: {6: 1.0} for t in CELL_TYPES}  # no cell type: both
    assert parse_logit_prior("") == {}
    plain, primed = (Architecture(seed=3, prior=p) for p in (None, prior))
    d = {t: primed.logits[t].detach() - plain.logits[t].detach() for t in CELL_TYPES}  # the same noise under both
    expect = torch.zeros(len(PRIMITIVES))
    expect[1], expect[5] = 2.0, -1.0
    assert torch.allclose(d["reduce"], expect.expand(14, -1))
    expect = torch.zeros(len(PRIMITIVES))
    expect[SKIP] = 0.5
    assert torch.allclose(d["normal"], expect.expand(14, -1))
    primed.logits["reduce"].data[4, 0] = float("nan")
    primed.repair_()  # a repaired row starts again from the prior, not from the plain init
    row = [0.0] * len(PRIMITIVES)
    row[NONE], row[SKIP], row[1], row[5] = primed.none_init, primed.skip_init, 2.0, -1.0
    assert primed.logits["reduce"][4].tolist() == row


@pytest.mark.parametrize("text, says", [("reduce:max_pool=2", "unknown op 'max_pool'"),
                                        ("cells:max_pool_3x3=2", "unknown cell type 'cells'"),
                                        ("max_pool_3x3", "expected op=number"),
                                        ("max_pool_3x3=big", "expected op=number"),
                                        ("max_pool_3x3=inf", "expected op=number")])
def test_logit_prior_errors_name_the_bad_part(text, says):
    with pytest.raises(ConfigError, match=says):
        parse_logit_prior(text)


def test_warmup_is_exactly_one_hot_skip_without_gradient():
    arch = Architecture()
    sample = arch.sample("warmup")
    for t in CELL_TYPES:
        w = sample[t].weights
        expected = torch.zeros_like(w)
        expected[:, SKIP] = 1.0
        assert torch.equal(w, expected) and not w.requires_grad
        assert sample[t].active == [(SKIP,)] * 14 and sample[t].unit


def test_hard_sampling_is_one_hot_with_a_straight_through_gradient():
    arch = Architecture(seed=1)
    arch.tau = 0.7
    sample = arch.sample("search", grad=True, generator=torch.Generator().manual_seed(0))
    w = sample["normal"].weights
    assert torch.allclose(w.detach().sum(1), torch.ones(14))
    assert set(w.detach().flatten().round(decimals=5).tolist()) <= {0.0, 1.0}
    chosen = w.detach().argmax(1).tolist()
    assert sample["normal"].active == [() if k == NONE else (k,) for k in chosen]
    # gradient through the chosen weight reaches every logit of the edge (softmax Jacobian)
    w[torch.arange(14), w.detach().argmax(1)].sum().backward()
    g = arch.logits["normal"].grad
    assert torch.isfinite(g).all() and (g != 0).all()


def test_weight_steps_get_constant_weights():
    arch = Architecture()
    sample = arch.sample("search", grad=False)
    assert not sample["normal"].weights.requires_grad and sample["normal"].unit


def test_gumbel_samples_follow_the_logits():
    arch = Architecture(init_std=0.0)
    with torch.no_grad():
        arch.logits["normal"].zero_()
        arch.logits["normal"][:, 4] = math.log(6.0)  # sep_conv_3x3 six times as likely as each other op
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(len(PRIMITIVES))
    for _ in range(300):
        for k in arch.sample("search", generator=gen)["normal"].weights.argmax(1).tolist():
            counts[k] += 1
    freq = counts / counts.sum()
    assert abs(freq[4] - 6 / 13) < 0.03 and abs(freq[0] - 1 / 13) < 0.02, freq


def test_soft_mode_thresholds():
    arch = Architecture(hard=False, skip_threshold=0.1, dominant_threshold=0.6, keep_threshold=0.2)
    soft = torch.tensor([[0.02, 0.05, 0.05, 0.5, 0.2, 0.08, 0.05, 0.05],    # below dominant: > 0.1 run
                         [0.01, 0.01, 0.01, 0.7, 0.25, 0.01, 0.005, 0.005],  # dominant: top + above keep (0.25)
                         [0.02, 0.03, 0.05, 0.05, 0.05, 0.8, 0.0, 0.0],       # dominant alone
                         [0.7, 0.05, 0.05, 0.05, 0.05, 0.05, 0.03, 0.02],    # dominant none: nothing runs
                         [0.4, 0.08, 0.08, 0.15, 0.08, 0.11, 0.06, 0.04]])   # none never runs, even when large
    assert arch._thresholded(soft) == [(3, 4), (3, 4), (5,), (), (3, 5)]


def test_nan_logits_fall_back_to_skip_and_are_counted():
    arch = Architecture()
    with torch.no_grad():
        arch.logits["normal"][3, 2] = float("nan")
        arch.logits["reduce"][5, 0] = float("inf")
    sample = arch.sample("search", grad=True, generator=torch.Generator().manual_seed(0))
    assert sample["normal"].active[3] == (SKIP,) and sample["reduce"].active[5] == (SKIP,)
    assert arch.state.nan_events == 2
    assert torch.isfinite(sample["normal"].weights).all() and torch.isfinite(sample["reduce"].weights).all()
    (sample["normal"].weights.sum() + sample["reduce"].weights.sum()).backward()
    for t in CELL_TYPES:
        assert torch.isfinite(arch.logits[t].grad).all()  # the where() trap would put NaN here
    arch.repair_()  # on the device: reset to the prior and counted, no host read
    assert arch.state.repaired_rows == 2 and torch.isfinite(arch.logits["normal"]).all()
    prior = [0.0] * len(PRIMITIVES)
    prior[PRIMITIVES.index("none")], prior[SKIP] = arch.none_init, arch.skip_init
    assert arch.logits["normal"][3].tolist() == prior


def test_gumbel_noise_never_takes_log_of_zero(monkeypatch):
    arch = Architecture()
    monkeypatch.setattr(torch.Tensor, "exponential_", lambda self, **kw: self.zero_())
    sample = arch.sample("search", grad=True)
    assert torch.isfinite(sample["normal"].weights).all() and arch.state.nan_events == 0


@pytest.mark.parametrize("kind", ["exp", "linear"])
def test_temperature_schedule(kind):
    taus = [temperature(s, 101, 2.0, 0.1, kind) for s in range(101)]
    assert taus[0] == pytest.approx(2.0) and taus[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in zip(taus, taus[1:]))
    if kind == "exp":
        assert taus[50] == pytest.approx(math.sqrt(2.0 * 0.1))
    else:
        assert taus[50] == pytest.approx(1.05)
    assert temperature(500, 101, 2.0, 0.1, kind) == pytest.approx(0.1)  # clamped past the end
    with pytest.raises(ConfigError):
        temperature(0, 10, 2.0, 0.1, "cosine")


def test_statistics():
    arch = Architecture()
    arch.sample("search", generator=torch.Generator().manual_seed(0))
    stats = arch.statistics()
    assert len(stats["normal_entropy"]) == 14 and 0 < stats["mean_entropy"] < math.log(8)
    assert sum(stats["normal_histogram"].values()) == 14
    assert all(0 < m <= 1 for m in stats["reduce_max_weight"])


def test_drift_is_a_steady_push_against_noise():
    """ArchState.drift: a gradient that always pushes one logit up gives sqrt(steps); independent noise of mean 0
    stays about N(0, 1) however many steps ran; a step that was not applied (`ok` false, a non-finite gradient
    included) counts for nothing."""
    arch, n = Architecture(), 400
    g = torch.Generator().manual_seed(0)
    for _ in range(n):
        grads = [torch.randn(14, 8, generator=g) for _ in CELL_TYPES]
        grads[0][3, 5] = -0.01                       # normal cell, edge 3, op 5: pushed up at every step
        grads[1][0, 2] = 0.0                         # reduce cell, edge 0, op 2: no gradient ever arrives
        arch.state.add_gradients(grads, torch.tensor(True))
    arch.state.add_gradients([torch.full((14, 8), float("nan"))] * 2, torch.tensor(False))
    z = arch.state.drift()
    assert int(arch.state.grad_steps) == n and torch.isfinite(z).all()
    assert z[0, 3, 5] == pytest.approx(math.sqrt(n))
    assert z[1, 0, 2] == 0.0
    noise = torch.cat([z[0].flatten()[:3 * 8 + 5], z[1].flatten()[3:]])
    assert abs(float(noise.mean())) < 0.2 and 0.8 < float(noise.std()) < 1.2
    stats = arch.statistics()
    assert stats["arch_grad_steps"] == n and stats["normal_drift"][3][5] == pytest.approx(math.sqrt(n), abs=0.01)
    assert len(stats["reduce_drift"]) == 14 and all(len(row) == 8 for row in stats["reduce_drift"])
    # against another op: a small steady difference under a large noise both ops share shows in the contrast alone
    arch = Architecture()
    common, steps = torch.zeros(14, 8), []
    for _ in range(n):
        grads = [torch.randn(14, 8, generator=g) * 0.1 for _ in CELL_TYPES]
        shared = torch.randn((), generator=g)
        grads[0][7, 4], grads[0][7, 6] = shared, shared + 0.05  # op 4 pushed above op 6 by 0.05 a step
        steps.append(torch.stack(grads).double())
        arch.state.add_gradients(grads, torch.tensor(True))
    against = torch.full((2, 14), 6)
    z_vs, z = arch.state.drift(against), arch.state.drift()
    assert z_vs[0, 7, 4] == pytest.approx(math.sqrt(n)) and abs(float(z[0, 7, 4])) < 3
    assert z_vs[0, 7, 6] == 0.0  # an op against itself
    d = torch.stack(steps) - torch.stack(steps)[..., 6:7]  # the contrast computed step by step
    assert torch.allclose(z_vs, torch.where(d.pow(2).sum(0) > 0, -d.sum(0) / d.pow(2).sum(0).sqrt(), 0.0))


def _hand_set(arch: Architecture, picks: dict) -> None:
    """picks: {cell_type: {edge: (op_index, strength)}}; every other logit is 0 (none at -10)."""
    with torch.no_grad():
        for t in CELL_TYPES:
            arch.logits[t].zero_()
            arch.logits[t][:, NONE] = -10.0
            for e, (k, v) in picks.get(t, {}).items():
                arch.logits[t][e, k] = v


def test_genotype_follows_the_darts_rule():
    arch = Architecture()
    sep3, dil5, mp, skip = 4, 7, 1, 3
    _hand_set(arch, {"normal": {edge_index(0, 0): (sep3, 3.0), edge_index(0, 1): (dil5, 2.0),
                                edge_index(1, 2): (mp, 5.0), edge_index(1, 0): (skip, 4.0),
                                edge_index(2, 3): (sep3, 3.0), edge_index(2, 1): (sep3, 2.5),
                                edge_index(3, 4): (dil5, 6.0), edge_index(3, 0): (mp, 1.0)},
                     "reduce": {edge_index(n, 1): (mp, 2.0) for n in range(4)}})
    # none is strong on one edge, but never chosen
    with torch.no_grad():
        arch.logits["normal"][edge_index(3, 2), NONE] = 9.0
    g = arch.genotype()
    assert g.normal == [("sep_conv_3x3", 0), ("dil_conv_5x5", 1), ("skip_connect", 0), ("max_pool_3x3", 2),
                        ("sep_conv_3x3", 1), ("sep_conv_3x3", 3), ("max_pool_3x3", 0), ("dil_conv_5x5", 4)]
    assert [src for _, src in g.reduce[::2]] == [0, 0, 0, 0] and g.reduce[1] == ("max_pool_3x3", 1)
    assert g.normal_concat == [2, 3, 4, 5] == g.reduce_concat


def test_genotype_json_round_trip(tmp_path):
    g = Architecture(seed=3).genotype()
    path = tmp_path / "genotype.json"
    path.write_text(json.dumps(g.to_json()))
    again = Genotype.load(str(path))
    assert again == g
    assert set(g.to_json()) == {"normal", "normal_concat", "reduce", "reduce_concat"}
    line = str(g)
    assert "\n" not in line and line.startswith("normal: ") and "//  reduce: " in line


@pytest.mark.parametrize("bad,needle", [
    ({"normal": [["conv_9x9", 0]] * 8}, "unknown op"),
    ({"normal": [["sep_conv_3x3", 5]] * 8}, "reads state 5"),
    ({"normal": [["sep_conv_3x3", 0]] * 7}, "two per node"),
    ({"reduce_concat": None}, "not a DARTS genotype"),
])
def test_bad_genotypes_are_rejected_with_the_reason(tmp_path, bad, needle):
    data = {**Architecture().genotype().to_json(), **bad}
    path = tmp_path / "g.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=needle):
        Genotype.load(str(path))
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        Genotype.load(str(path))


def test_random_genotypes_are_valid_seeded_and_uniform():
    import numpy as np
    draws = [Genotype.random(np.random.default_rng([7, i])) for i in range(400)]
    assert Genotype.random(np.random.default_rng([7, 0])) == draws[0]  # seeded: the same draw again
    assert len({str(g) for g in draws}) == len(draws)
    op_counts = dict.fromkeys(PRIMITIVES, 0)
    input_counts = [[0] * (2 + node) for node in range(4)]
    for g in draws:
        assert Genotype.from_json(g.to_json()) == g  # a valid DARTS genotype
        for t in CELL_TYPES:
            pairs = getattr(g, t)
            for node in range(4):
                (_, a), (_, b) = pairs[2 * node: 2 * node + 2]
                assert a != b and 0 <= a < b < 2 + node  # two distinct earlier states
                input_counts[node][a] += 1
                input_counts[node][b] += 1
            for op, _ in pairs:
                op_counts[op] += 1
    assert op_counts["none"] == 0
    expected = 400 * 2 * 8 / 7  # 6,400 edges over the 7 ops other than none
    assert all(abs(op_counts[op] - expected) < 0.1 * expected for op in PRIMITIVES if op != "none"), op_counts
    for node, counts in enumerate(input_counts):  # each earlier state is an input equally often
        share = 400 * 2 * 2 / (2 + node)
        assert all(abs(c - share) < 0.15 * share for c in counts), (node, counts)


def test_random_genotypes_across_costs_run_from_all_convolutions_to_none():
    import numpy as np
    gs = Genotype.across_costs(np.random.default_rng(3), 9)
    shares = [(g.param_free_fraction()["normal"] + g.param_free_fraction()["reduce"]) / 2 for g in gs]
    assert len(gs) == 9 and shares[0] == 0.0 and shares[-1] == 1.0
    assert np.corrcoef(np.arange(9), shares)[0, 1] > 0.8   # the share of parameter-free edges rises along them
    assert gs == Genotype.across_costs(np.random.default_rng(3), 9)   # seeded


def test_param_free_fraction():
    g = Genotype.from_json({"normal": [["skip_connect", 0], ["sep_conv_3x3", 1], ["max_pool_3x3", 0], ["dil_conv_3x3", 2],
                                       ["avg_pool_3x3", 1], ["sep_conv_5x5", 2], ["dil_conv_5x5", 0], ["sep_conv_3x3", 4]],
                            "normal_concat": [2, 3, 4, 5],
                            "reduce": [["skip_connect", 0], ["skip_connect", 1]] * 4, "reduce_concat": [2, 3, 4, 5]})
    assert g.param_free_fraction() == {"normal": 3 / 8, "reduce": 1.0}


def test_param_free_caps_in_each_cell_type():
    # pools and skips lead on every edge of both cells (max_pool strongest), convs come second
    probs = {}
    for t in CELL_TYPES:
        p = torch.full((num_edges(4), len(PRIMITIVES)), 0.01)
        p[:, PRIMITIVES.index("max_pool_3x3")] = torch.linspace(0.4, 0.5, num_edges(4))
        p[:, PRIMITIVES.index("avg_pool_3x3")] = 0.35
        p[:, SKIP] = 0.32
        p[:, PRIMITIVES.index("sep_conv_3x3")] = 0.3
        probs[t] = p
    uncapped = Genotype.from_probabilities(probs, 4)
    assert uncapped.param_free_fraction() == {"normal": 1.0, "reduce": 1.0}
    capped = Genotype.from_probabilities(probs, 4, max_param_free=3)
    assert capped.param_free_fraction() == {"normal": 3 / 8, "reduce": 1.0}
    assert capped.reduce == uncapped.reduce
    # ruling out an edge's pool lets its next parameter-free op (avg, then skip) lead there, so every
    # parameter-free op on an edge goes before its conv does; the ones kept are the strongest max_pools
    # of the edges the uncapped cell chose
    nodes_of = [0, 0, 1, 1, 2, 2, 3, 3]
    edges = lambda g, ops: sorted(edge_index(n, s) for n, (op, s) in zip(nodes_of, g.normal) if op in ops)  # noqa: E731
    assert {op for op, _ in capped.normal} == {"max_pool_3x3", "sep_conv_3x3"}
    pool = PRIMITIVES.index("max_pool_3x3")
    strongest = sorted(edges(uncapped, PRIMITIVES), key=lambda e: -float(probs["normal"][e, pool]))[:3]
    assert edges(capped, ("max_pool_3x3",)) == sorted(strongest)
    # both caps at once: the skip cap never lets more parameter-free ops through
    both = Genotype.from_probabilities(probs, 4, max_skip=0, max_param_free=2)
    assert sum(op in ("max_pool_3x3", "avg_pool_3x3", "skip_connect") for op, _ in both.normal) == 2
    arch = Architecture(max_param_free=3)
    with torch.no_grad():
        for t in CELL_TYPES:
            arch.logits[t].copy_(probs[t].log())
    assert arch.genotype() == capped
    # the reduction cell's cap acts on the reduction cell alone, by the same rule
    reduce_only = Genotype.from_probabilities(probs, 4, max_param_free_reduce=3)
    assert reduce_only.param_free_fraction() == {"normal": 1.0, "reduce": 3 / 8}
    assert reduce_only.normal == uncapped.normal and reduce_only.reduce == capped.normal
    arch = Architecture(max_param_free=3, max_param_free_reduce=1)
    with torch.no_grad():
        for t in CELL_TYPES:
            arch.logits[t].copy_(probs[t].log())
    g = arch.genotype()
    assert g.normal == capped.normal and g.param_free_fraction()["reduce"] == 1 / 8


def test_skip_caps_in_each_cell_type():
    # skip_connect is the best op on every edge of both cells; the second best is a conv with a lower weight
    probs = {}
    for t in CELL_TYPES:
        p = torch.full((num_edges(4), len(PRIMITIVES)), 0.01)
        p[:, SKIP] = torch.linspace(0.5, 0.6, num_edges(4))
        p[:, PRIMITIVES.index("dil_conv_3x3")] = 0.3
        probs[t] = p
    uncapped = Genotype.from_probabilities(probs, 4)
    assert all(op == "skip_connect" for op, _ in uncapped.normal + uncapped.reduce)
    normal_only = Genotype.from_probabilities(probs, 4, max_skip=2)
    assert sum(op == "skip_connect" for op, _ in normal_only.normal) == 2
    assert normal_only.reduce == uncapped.reduce
    both = Genotype.from_probabilities(probs, 4, max_skip=2, max_skip_reduce=1)
    assert both.normal == normal_only.normal
    assert sum(op == "skip_connect" for op, _ in both.reduce) == 1
    # the skips kept are the strongest ones; the others fall back to their edge's next best op
    assert {op for op, _ in both.reduce} == {"skip_connect", "dil_conv_3x3"}
    arch = Architecture(max_skip=2, max_skip_reduce=1)
    with torch.no_grad():
        for t in CELL_TYPES:
            arch.logits[t].copy_(probs[t].log())
    assert arch.genotype() == both
