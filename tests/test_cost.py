"""engine/cost.py: a genotype's parameters and multiply-accumulates from the per-edge table equal the whole
derived network's, counted directly."""
import json

import numpy as np
import pytest
import torch

from engine.cli import main
from engine.config import preset
from engine.cost import CostTerm, cheapest, cost_table, network_cost
from engine.errors import ConfigError
from engine.genotype import CELL_TYPES, NONE, Genotype, edge_index
from engine.ops import PRIMITIVES
from engine.report import write_report
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


# ------------------------------------------------------------------------------------------ the cost term
def _term(metric="macs", target=1.0, weight=1.0):
    spec, hw = _spec("smoke")
    return CostTerm(cost_table(spec, hw), metric, target, weight)


def test_the_expected_cost_leaves_none_out_and_weights_edges_by_what_the_derivation_keeps():
    term = _term()
    table, nodes = term.table, term.table.spec.nodes
    logits = {t: torch.zeros(14, 8) for t in CELL_TYPES}
    by_hand = table.fixed["macs"]
    for t in CELL_TYPES:
        for node in range(nodes):
            for src in range(2 + node):
                row = table.edges["macs"][t][edge_index(node, src)]
                by_hand += 2 / (2 + node) * sum(row[1:]) / 7      # the seven ops that are not `none`
    assert float(term.expected(logits)) == pytest.approx(by_hand)
    # `none` made certain changes nothing: the derivation never keeps it, so it cannot make a network cheap
    logits["normal"][:, NONE] = 50.0
    assert float(term.expected(logits)) == pytest.approx(by_hand)
    # a genotype's own cost: the expected cost of one-hot edges on its edges, with its other edges' weight moved
    # onto them, is what the table says for it (two of each node's edges, each with keep share 2/(2+node))
    assert term.derived(Genotype.random(np.random.default_rng(0), nodes)) > table.fixed["macs"]


def test_the_derived_cost_is_the_cost_of_the_genotype_the_derivation_gives():
    term = _term()
    gen = torch.Generator().manual_seed(0)
    for _ in range(5):
        logits = {t: torch.randn(14, 8, generator=gen) for t in CELL_TYPES}
        probs = {t: torch.softmax(logits[t], 1) for t in CELL_TYPES}
        g = Genotype.from_probabilities(probs, 4)
        assert float(term.derived_cost(logits)) == pytest.approx(term.derived(g))


def test_the_penalty_values_the_derived_genotype_and_stops_pulling_once_it_fits():
    term = _term()
    logits = {t: torch.zeros(14, 8, requires_grad=True) for t in CELL_TYPES}
    for t in CELL_TYPES:
        with torch.no_grad():
            logits[t][:, PRIMITIVES.index("max_pool_3x3")] = 1.0    # the derivation picks pools everywhere
    derived = float(term.derived_cost(logits))
    assert derived < float(term.expected(logits).detach())           # the expectation still holds the convs
    at = CostTerm(term.table, "macs", target=1.01 * derived, weight=1.0)
    value = at(logits)
    value.backward()
    assert float(value.detach()) == 0.0 and all(float(logits[t].grad.abs().sum()) == 0 for t in CELL_TYPES)
    over = CostTerm(term.table, "macs", target=0.5 * derived, weight=1.0)
    assert float(over(logits).detach()) == pytest.approx(np.log(2.0))


def test_the_penalty_is_zero_under_the_target_and_pulls_toward_cheap_ops_over_it():
    logits = {t: torch.zeros(14, 8, requires_grad=True) for t in CELL_TYPES}
    under = _term(target=1e12)
    value = under(logits)
    value.backward()
    assert float(value.detach()) == 0.0 and all(float(logits[t].grad.abs().sum()) == 0 for t in CELL_TYPES)
    term = _term(target=1.0, weight=1.0)
    start = float(term.expected(logits).detach())
    opt = torch.optim.Adam(logits.values(), lr=0.1)
    for _ in range(20):
        opt.zero_grad()
        term(logits).backward()
        opt.step()
    assert float(term.expected(logits).detach()) < 0.8 * start
    # the pull goes to the ops that cost least: on the normal cell's first edge, a pool gains on sep_conv_5x5
    sep5, pool = PRIMITIVES.index("sep_conv_5x5"), PRIMITIVES.index("max_pool_3x3")
    assert float(logits["normal"][0, pool].detach()) > float(logits["normal"][0, sep5].detach())


def test_cheapest_is_a_lower_bound_that_a_genotype_reaches():
    term = _term(metric="params")
    low = cheapest(term.table, "params")
    rng = np.random.default_rng(3)
    assert all(term.derived(Genotype.random(rng, 4)) >= low for _ in range(30))
    free = Genotype([("skip_connect", 0), ("skip_connect", 1)] * 4, [2, 3, 4, 5],
                    [("max_pool_3x3", 0), ("max_pool_3x3", 1)] * 4, [2, 3, 4, 5])
    assert term.derived(free) >= low and term.verdict(1.05 * term.target) is None
    assert "over the target" in term.verdict(2 * term.target)


@pytest.mark.parametrize("assignment, says", [
    (["cost=flops"], "cost"), (["cost=macs"], "cost_target"), (["cost=params", "cost_target=1e5", "cost_weight=-1"],
                                                             "cost_weight"),
    (["cost=latency", "cost_target=3"], "aso-se latency")])
def test_a_wrong_cost_config_is_one_line_naming_the_field(assignment, says):
    with pytest.raises(ConfigError, match=says):
        preset("smoke").override(assignment)


def test_a_search_under_a_cost_target_derives_a_cheaper_network_and_reports_it(tmp_path, capsys):
    """Smoke: the same search with and without the term (arch_lr raised so that one epoch moves the logits)."""
    common = ["--preset", "smoke", "--set", "arch_lr=0.05", "--set", "growth_epochs=0", "--set", "optimize_epochs=0"]
    assert main(["search", *common, "--out", str(tmp_path / "off")]) == 0
    low = cost_table(*_spec("smoke"))
    target = 1.02 * cheapest(low, "macs")
    assert main(["search", *common, "--set", "cost=macs", "--set", f"cost_target={target}", "--set", "cost_weight=5",
                 "--out", str(tmp_path / "on")]) == 0
    out = capsys.readouterr().out
    off, on = (json.load(open(tmp_path / d / "final.json")) for d in ("off", "on"))
    assert "cost" not in off and on["cost"]["metric"] == "macs" and on["cost"]["target"] == pytest.approx(target)
    derived_off = low.of(Genotype.from_json(off["genotype"]))["macs"]
    assert on["cost"]["derived"] < derived_off
    records = [json.loads(line) for line in open(tmp_path / "on" / "metrics.jsonl")]
    search = [r["cost"]["expected"] for r in records if r.get("phase") == "search"]
    warmup = [r["cost"]["expected"] for r in records if r.get("phase") == "warmup"]
    assert search[-1] < warmup[-1]                       # the term moved the distributions toward cheap ops
    assert "cost term:" in out and "random mean" in out
    page = open(write_report(str(tmp_path / "on"))).read()
    assert "Accuracy and cost" in page and (tmp_path / "on" / "report" / "cost.png").exists()
    assert "Accuracy and cost" not in open(write_report(str(tmp_path / "off"))).read()
    if on["cost"]["derived"] > 1.1 * target:
        assert "over the target" in out
