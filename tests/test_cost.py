"""engine/cost.py: a genotype's parameters and multiply-accumulates from the per-edge table equal the whole
derived network's, counted directly."""
import numpy as np
import pytest
import torch

from engine.config import preset
from engine.cost import cost_table, network_cost
from engine.genotype import CELL_TYPES, Genotype
from engine.network import darts_spec, derived_spec


def _spec(name):
    cfg = preset(name)
    c_in = 1 if name == "fashion-mnist" else cfg.synthetic_channels
    spec = darts_spec(c_in, 10, cfg.channels, cfg.layers, cfg.nodes, cfg.stem_multiplier, cfg.stem_stride)
    hw = (28, 28) if name == "fashion-mnist" else (cfg.synthetic_size, cfg.synthetic_size)
    return derived_spec(spec, **cfg.derived_shape()), hw


@pytest.mark.parametrize("name", ["smoke", "fashion-mnist"])
def test_the_table_gives_every_genotypes_cost_exactly(name):
    spec, hw = _spec(name)
    table = cost_table(spec, hw)
    rng = np.random.default_rng(1)
    seen = set()
    for _ in range(4):
        g = Genotype.random(rng, spec.nodes)
        assert table.of(g) == network_cost(spec, g, hw)
        seen.add(table.of(g)["params"])
    assert len(seen) > 1   # the genotypes differ in cost: the edges' entries carry it, not the fixed part
    convs = Genotype([("sep_conv_5x5", 0), ("sep_conv_5x5", 1)] * 4, [2, 3, 4, 5],
                     [("sep_conv_5x5", 0), ("sep_conv_5x5", 1)] * 4, [2, 3, 4, 5])
    free = Genotype([("skip_connect", 0), ("max_pool_3x3", 1)] * 4, [2, 3, 4, 5],
                    [("max_pool_3x3", 0), ("max_pool_3x3", 1)] * 4, [2, 3, 4, 5])
    assert table.of(convs)["macs"] > table.of(free)["macs"] and table.of(convs)["params"] > table.of(free)["params"]
    skip = 3
    assert all(row[skip] == 0 for row in table.edges["params"]["normal"])        # identity: nothing to learn
    assert all(row[skip] > 0 for row in table.edges["params"]["reduce"][:2])     # strided: FactorizedReduce
    assert table.of(convs) == network_cost(spec, convs, hw) and table.of(free) == network_cost(spec, free, hw)


def test_expected_cost_is_the_probability_weighted_sum_and_differentiable():
    spec, hw = _spec("smoke")
    table = cost_table(spec, hw)
    logits = {t: torch.zeros(14, 8, requires_grad=True) for t in CELL_TYPES}
    probs = {t: torch.softmax(logits[t], 1) for t in CELL_TYPES}
    value = table.expected(probs, "macs")
    by_hand = sum(sum(row) / 8 for t in CELL_TYPES for row in table.edges["macs"][t])
    assert float(value.detach()) == pytest.approx(by_hand)
    value.backward()
    assert logits["normal"].grad is not None and float(logits["normal"].grad.abs().sum()) > 0
