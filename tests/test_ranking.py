"""bench/ranking.py: the supernet's ranking of genotypes against their standalone accuracies."""
import json

import numpy as np
import pytest

from engine.config import preset
from engine.correlation import kendall_tau_b, ranks, spearman
from engine.genotype import Genotype
from engine.trainer import Trainer

from .conftest import load_bench

ranking = load_bench("ranking")


def test_kendall_and_spearman_on_hand_computed_cases():
    x = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    assert kendall_tau_b(x, x * 3) == 1.0 and kendall_tau_b(x, -x) == -1.0
    # one swapped neighbour pair: 9 concordant, 1 discordant of 10 pairs
    assert kendall_tau_b(x, np.array([1.0, 3.0, 2.0, 4.0, 5.0])) == pytest.approx(0.8)
    # tau-b with a tie in y: n0 = 10, ties in y 1 pair: (C - D) / sqrt(10 * 9); C = 9, D = 0
    assert kendall_tau_b(x, np.array([1.0, 2.0, 2.0, 4.0, 5.0])) == pytest.approx(9 / np.sqrt(90))
    assert np.isnan(kendall_tau_b(x, np.ones(5)))
    assert spearman(x, np.array([1.0, 3.0, 2.0, 4.0, 5.0])) == pytest.approx(1 - 6 * 2 / (5 * 24))
    assert list(ranks(np.array([3.0, 1.0, 3.0]))) == [2.5, 1.0, 2.5]
    c = ranking.correlations(x, x + 0.1, boot=200)
    assert c["kendall_tau"] == 1.0 and c["kendall_tau_ci95"] == [1.0, 1.0]


@pytest.mark.slow
def test_ranking_of_a_smoke_search(tmp_path, capsys):
    """End to end on a smoke search's checkpoint: every genotype of a results file evaluated with the shared
    weights, with and without BN re-estimation; the search's BN statistics are restored between genotypes, so
    the same genotype twice gives the same accuracies."""
    run = tmp_path / "run"
    Trainer(preset("smoke").override(["optimize_epochs=0"]), str(run), log=lambda *_: None).run()
    rng = np.random.default_rng(0)
    genotypes = [Genotype.random(rng) for _ in range(4)]
    records = [{"name": f"g{i}", "genotype_json": g.to_json(), "test_acc": 0.5 + 0.1 * i}
               for i, g in enumerate(genotypes)]
    records.append(dict(records[0], name="g0-again"))
    results = tmp_path / "results.json"
    results.write_text(json.dumps({"records": records}))
    out = tmp_path / "ranking.json"
    assert ranking.main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--results", str(results),
                         "--bn-batches", "3", "--bootstrap", "50", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = {r["name"]: r for r in data["records"]}
    for key in ("shared", "shared_bn", "shared_loss", "shared_bn_loss"):   # the loss: accuracy is too coarse
        assert rows["g0"][key] == rows["g0-again"][key], key
    assert rows["g0"]["shared_loss"] != rows["g1"]["shared_loss"]
    assert all(0 <= r["shared"] <= 1 and 0 <= r["shared_bn"] <= 1 for r in rows.values())
    assert set(data["correlations"]) == {"shared", "shared_bn"}
    assert data["bn_batches_used"] == [3] and "BN re-estimated (3 batches)" in capsys.readouterr().out
    # asked for more batches than the training split holds: all of them, and the record says how many
    assert ranking.main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--results", str(results),
                         "--bn-batches", "100000", "--bootstrap", "10", "--json", str(tmp_path / "all.json")]) == 0
    [used] = json.loads((tmp_path / "all.json").read_text())["bn_batches_used"]
    assert 3 < used < 100000 and f"BN re-estimated ({used} batches)" in capsys.readouterr().out

    # two supernets: each ranked on its own, and the genotypes ranked by their mean accuracy over both
    both = tmp_path / "both.json"
    assert ranking.main(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--checkpoint",
                         str(run / "checkpoints" / "search.pt"), "--results", str(results), "--bn-batches", "3",
                         "--bootstrap", "50", "--json", str(both)]) == 0
    two = json.loads(both.read_text())
    assert [c["checkpoint"] for c in two["per_checkpoint"]] == two["checkpoint"]
    assert two["per_checkpoint"][0]["shared_bn"] == data["correlations"]["shared_bn"]   # last.pt alone, as above
    for r, alone in zip(two["records"], data["records"]):
        assert r["per_checkpoint"][0]["shared_bn_loss"] == alone["shared_bn_loss"]
        other = r["per_checkpoint"][1]["shared_bn_loss"]
        assert r["shared_bn_loss"] == pytest.approx((alone["shared_bn_loss"] + other) / 2)
    assert two["records"][0]["per_checkpoint"][1]["shared_loss"] != rows["g0"]["shared_loss"]   # another supernet
    shared = np.array([r["shared_bn"] for r in two["records"]])
    assert two["correlations"]["shared_bn"]["kendall_tau"] == pytest.approx(
        kendall_tau_b(shared, np.array([r["standalone"] for r in two["records"]])), nan_ok=True)


def test_bad_inputs_are_one_line(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert ranking.main(["--checkpoint", str(tmp_path / "none.pt"), "--results", str(bad)]) == 2
    assert "not a protocol results file" in capsys.readouterr().err
