"""engine/latency.py and `aso-se latency`: the per-op latency table, its fixed part, its check against whole
networks, and how a search reads it. No timing is asserted: the timer is replaced where the logic is tested."""
import json

import numpy as np
import pytest

from engine import latency
from engine.build import build_cost_term, load_data, optimize_spec
from engine.cli import main
from engine.config import preset
from engine.errors import ConfigError
from engine.genotype import Genotype
from engine.ops import PRIMITIVES


def test_steady_ms_keeps_each_keys_fastest_round(monkeypatch):
    """A burst that slows one round of a key does not reach its figure; rounds visit the keys in turn."""
    script = {"a": iter([9.0, 2.0, 3.0]), "b": iter([1.0, 8.0, 1.5])}
    order = []
    monkeypatch.setattr(latency, "median_ms", lambda fn, device: fn())
    fns = {k: (lambda k=k: order.append(k) or next(script[k])) for k in script}
    out = latency.steady_ms(fns, device=None, rounds=3, warmup=0)
    assert out == {"a": 2.0, "b": 1.0} and order == ["a", "b"] * 3


def test_table_sums_the_ops_of_a_genotype_and_calibrates_the_fixed_part_on_probes(monkeypatch):
    """With a fake clock (each call 'takes' a fixed time per module), the table's prediction of every network is
    exact, and the fixed part is what the probes' time leaves after their edges."""
    cfg = preset("smoke")
    spec, hw = optimize_spec(cfg, load_data(cfg)), (cfg.synthetic_size, cfg.synthetic_size)
    ops_ms = {}

    def fake(fns, device, rounds=5, warmup=3, progress=None):
        out = {}
        ops = [k for k in fns if k[0] in PRIMITIVES]
        for k in ops:
            out[k] = ops_ms.setdefault(k, 0.1 + 0.001 * len(ops_ms))
        table = latency.CostTable(spec, hw, {"latency": _edges(spec, hw, ops_ms)}, {"latency": 0.0})
        for kind, key in (k for k in fns if k not in ops):           # ("probe", i) and ("check", name)
            g = probes[key] if kind == "probe" else named[key]
            out[(kind, key)] = table.of(g)["latency"] + 7.0          # whole networks: their ops plus 7 ms of the rest
        return out

    rng = np.random.default_rng([0, 101])
    probes = [Genotype.random(rng, spec.nodes) for _ in range(3)]
    named = latency.check_genotypes(np.random.default_rng(5), 3, spec.nodes)
    monkeypatch.setattr(latency, "steady_ms", fake)
    table = latency.latency_table(spec, hw, batch=2, check_with=named)   # the check timed with the ops
    assert table.fixed["latency"] == pytest.approx(7.0) and table.meta["probe_residuals_ms"] == [7.0] * 3
    found = table.meta["check"]
    assert len(found["networks"]) == 6 and found["spearman"] == pytest.approx(1.0)
    assert found["median_abs_rel_error"] == pytest.approx(0.0, abs=1e-5)
    assert set(found["groups"]) == {"uniform random", "across the cost range", "all"}
    # the file round trip gives the same predictions
    back = latency.from_json(json.loads(json.dumps(latency.to_json(table))), "t.json")
    g = Genotype.random(np.random.default_rng(9), spec.nodes)
    assert back.of(g)["latency"] == pytest.approx(table.of(g)["latency"])


def _edges(spec, hw, timed):
    from engine.cost import edge_inputs, empty_edges
    edges = empty_edges(spec, ("latency",))["latency"]
    for t, e, c, stride, size in edge_inputs(spec, hw):
        for o, op in enumerate(PRIMITIVES):
            if op != "none":
                edges[t][e][o] += timed[(op, c, stride, size)]
    return edges


def test_check_genotypes_span_the_cost_range():
    named = latency.check_genotypes(np.random.default_rng(0), 4, 4)
    shares = {k: g.param_free_fraction() for k, g in named.items()}
    assert sum(k.startswith("random") for k in named) == 4
    assert shares["free000-0"] == {"normal": 0.0, "reduce": 0.0}
    assert shares["free100-3"] == {"normal": 1.0, "reduce": 1.0}


def test_aso_se_latency_writes_a_table_a_search_can_read(tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert main(["latency", "--preset", "smoke", "--batch", "2", "--threads", "1", "--check", "2",
                 "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    assert data["batch"] == 2 and data["machine"]["cpu_threads"] == 1 and len(data["check"]["networks"]) == 4
    assert all(r["measured_ms"] > 0 and r["predicted_ms"] > 0 for r in data["check"]["networks"])
    assert "check, all: Spearman" in capsys.readouterr().out
    cfg = preset("smoke").override(["cost=latency", "cost_target=1.0", f"latency_table={out}"])
    term = build_cost_term(cfg, load_data(cfg))
    assert term.metric == "latency" and term.table.fixed["latency"] == pytest.approx(data["fixed_ms"])


def test_a_table_for_another_network_or_a_bad_file_is_one_line(tmp_path, capsys):
    out = tmp_path / "lat.json"
    assert main(["latency", "--preset", "smoke", "--batch", "1", "--out", str(out)]) == 0
    other = preset("smoke").override(["cost=latency", "cost_target=1.0", f"latency_table={out}", "channels=6"])
    with pytest.raises(ConfigError, match="measured for another network"):
        build_cost_term(other, load_data(other))
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    before = bad.read_text()
    code = main(["search", "--preset", "smoke", "--set", "cost=latency", "--set", "cost_target=1",
                 "--set", f"latency_table={bad}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err[-1].startswith("aso-se: error: latency_table") and "not valid JSON" in err[-1]
    assert bad.read_text() == before
    missing = main(["search", "--preset", "smoke", "--set", "cost=latency", "--set", "cost_target=1",
                    "--set", f"latency_table={tmp_path / 'none.json'}", "--out", str(tmp_path / "run2")])
    assert missing == 2 and "aso-se latency --out" in capsys.readouterr().err
    assert main(["latency", "--preset", "smoke", "--batch", "0"]) == 2
