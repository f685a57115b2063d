"""bench/readme_figures.py: the README's main-job figures against the committed reference run."""
import json
import os

import pytest

from .conftest import load_bench

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
readme_figures = load_bench("readme_figures")

FINAL = {"test_acc": 0.93281, "params": 220214, "wall_s": 565.4}


def test_the_readme_states_the_committed_reference_run():
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    with open(os.path.join(ROOT, "bench", "results", "main-job", "final.json")) as f:
        final = json.load(f)
    assert readme_figures.check(readme, final) == []
    assert readme_figures.main([]) == 0


@pytest.mark.parametrize("edit", ["accuracy", "params", "wall"])
def test_an_edited_figure_fails_naming_its_line(edit, tmp_path, capsys):
    good = ("`make run` reaches **93.28%**<!--final:test_acc--> with 220,214<!--final:params--> parameters "
            "in 9m25s<!--final:wall_s-->.\n")
    bad = {"accuracy": good.replace("93.28%", "93.38%"), "params": good.replace("220,214", "220,241"),
           "wall": good.replace("9m25s", "9m20s")}[edit]
    assert readme_figures.check(good, FINAL) == []
    problems = readme_figures.check("intro\n" + bad, FINAL)
    assert len(problems) == 1 and problems[0].startswith("README line 2:")
    (tmp_path / "README.md").write_text(bad)
    (tmp_path / "final.json").write_text(json.dumps(FINAL))
    assert readme_figures.main(["--readme", str(tmp_path / "README.md"), "--final", str(tmp_path / "final.json")]) == 1
    assert "the reference run has" in capsys.readouterr().out


def test_an_untagged_figure_on_a_main_job_line_fails_and_another_runs_figure_may_be_marked():
    tagged = "The main job: **93.28%**<!--final:test_acc-->"
    assert readme_figures.check(tagged + ", the hand-made CNN 93.29%.", FINAL) == [
        "README line 1: 93.29% on a line about the main job has no tag (<!--final:FIELD--> or <!--not-final-->)"]
    assert readme_figures.check(tagged + ", the CNN 278,890 parameters.", FINAL)[0].startswith("README line 1: 278,890")
    assert readme_figures.check(tagged + ", the hand-made CNN **93.29%**<!--not-final-->.", FINAL) == []
    # figures on lines that are not about the main job are not this check's business
    assert readme_figures.check(tagged + "\nthe hand-made CNN 93.29%", FINAL) == []
    assert readme_figures.check("no tags at all", FINAL) == [
        "README: no tagged main-job figure at all (<!--final:test_acc--> and the like)"]
    assert "unknown field 'acc'" in readme_figures.check("93.28%<!--final:acc-->", FINAL)[0]


def test_the_quoted_log_line_is_checked_too():
    tagged = "`make run`: **93.28%**<!--final:test_acc-->\n```\n"
    assert readme_figures.check(tagged + "== test accuracy 93.28%  (220,214 params, wall 9m25s)\n```", FINAL) == []
    problems = readme_figures.check(tagged + "== test accuracy 93.28%  (220,214 params, wall 9m26s)\n```", FINAL)
    assert len(problems) == 1 and problems[0].startswith("README line 3: the quoted log says")


def test_a_missing_reference_exits_2(tmp_path, capsys):
    (tmp_path / "README.md").write_text("x")
    assert readme_figures.main(["--readme", str(tmp_path / "README.md"), "--final", str(tmp_path / "no.json")]) == 2
    assert "readme_figures: error" in capsys.readouterr().err


@pytest.mark.parametrize("wall_s", [565.4, 790.6, 874.5, 59.99])
def test_the_wall_time_is_written_as_the_runs_own_log_writes_it(wall_s):
    """The quoted `== test accuracy ... wall 13m10s` line and the tagged figures must agree with the log the run
    printed: whole seconds, cut (790.6 s is 13m10s there, not 13m11s)."""
    from engine.records import fmt_time
    assert readme_figures.formats({**FINAL, "wall_s": wall_s})["wall_s"] == fmt_time(wall_s)
