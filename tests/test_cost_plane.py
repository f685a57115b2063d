"""bench/cost_plane.py: the random genotypes' line and Pareto front, and the plane drawn from results files."""
import json

import numpy as np
import pytest

from engine.cli import TRAIN_ONLY
from engine.config import preset
from engine.genotype import Genotype

from .conftest import load_bench

plane = load_bench("cost_plane")


def test_front_keeps_what_nothing_beats_in_both_and_the_line_fits_log_cost():
    rows = [{"name": n, "macs": m, "test_acc": a} for n, m, a in
            [("a", 1.0, 0.5), ("b", 2.0, 0.7), ("c", 3.0, 0.6), ("d", 4.0, 0.9), ("e", 2.0, 0.4)]]
    assert [r["name"] for r in plane.front(rows, "macs")] == ["a", "b", "d"]
    line = [{"macs": m, "test_acc": 0.8 + 0.05 * np.log(m)} for m in (1.0, 2.0, 5.0)]
    a, b = plane.fit(line, "macs")
    assert a == pytest.approx(0.8) and b == pytest.approx(0.05)


def test_the_plane_with_spread_genotypes_alone_fits_one_line_and_without_random_ones_stops():
    spread = [{"name": f"spread{i}", "group": plane.RANDOM["spread"], "macs": m, "test_acc": a}
              for i, (m, a) in enumerate([(1.0, 0.5), (2.0, 0.6), (4.0, 0.7)])]
    searched = {"name": "s", "group": "searched, cost=macs <= 2", "macs": 2.0, "test_acc": 0.65}
    got = plane.plane(spread + [searched], None, "macs")
    assert list(got["lines"]) == ["all"] and got["random_mean"] == pytest.approx(7 / 3)
    assert got["rows"]["s"]["above"]["all"] == pytest.approx(0.05) and got["rows"]["s"]["inside"] == {"all": True}
    with pytest.raises(SystemExit, match="fewer than 2 random genotypes"):
        plane.plane(spread[:1] + [searched], None, "macs")


def test_the_plane_from_results_files(tmp_path, capsys):
    recipe = preset("smoke").override(TRAIN_ONLY)
    rng = np.random.default_rng(0)
    records = [{"name": f"random{i}", "kind": "random", "test_acc": 0.5 + 0.01 * i, "params": 1000 + i,
                "macs": 10_000 + 1000 * i, "genotype_json": Genotype.random(rng, 4).to_json()} for i in range(5)]
    records += [{"name": f"spread{i}", "kind": "spread", "test_acc": acc, "params": 500 + i, "macs": m,
                 "genotype_json": Genotype.random(rng, 4, free_share=share).to_json()}
                for i, (m, acc, share) in enumerate([(6000, 0.50, 1.0), (8000, 0.52, 0.7), (16_000, 0.58, 0.0)])]
    cheap = Genotype([("skip_connect", 0), ("max_pool_3x3", 1)] * 4, [2, 3, 4, 5],
                     [("max_pool_3x3", 0), ("max_pool_3x3", 1)] * 4, [2, 3, 4, 5])
    records.append({"name": "search0", "kind": "searched", "test_acc": 0.56, "params": 900, "macs": 9000,
                    "genotype_json": cheap.to_json()})
    path = tmp_path / "r.json"
    path.write_text(json.dumps({"protocol": {"recipe": recipe.to_json(), "search_set": ["cost=macs",
                                                                                        "cost_target=9500"]},
                                "records": records}))
    out = tmp_path / "plane"
    assert plane.main(["--results", str(path), "--json", str(tmp_path / "p.json"), "--figure", str(out)]) == 0
    got = json.loads((tmp_path / "p.json").read_text())
    row = got["report"]["costs"]["macs"]["rows"]["macs <= 9500:search0"]
    assert row["dominated_by"] == [] and row["share_of_random_mean"] == pytest.approx(9000 / 12_000)
    for which, pool in (("uniform", records[:5]), ("all", records[:8])):   # each line at its cost
        a, b = plane.fit(pool, "macs")
        assert row["above"][which] == pytest.approx(0.56 - (a + b * np.log(9000)))
    assert row["inside"] == {"uniform": False, "all": True}   # the uniform draws cost 10,000-14,000
    lines = got["report"]["costs"]["macs"]["lines"]
    assert lines["all"]["n"] == 8 and lines["all"]["range"] == [6000, 16_000]
    # a random genotype cheaper and better dominates; the front runs over all random genotypes
    assert got["report"]["costs"]["macs"]["front"] == ["spread0", "spread1", "random3", "random4", "spread2"]
    assert all(r["measured_ms"] > 0 for r in got["records"])
    assert (tmp_path / "plane.png").exists() and (tmp_path / "plane.svg").exists()
    assert "share" not in capsys.readouterr().err
