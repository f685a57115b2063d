"""The README's main-job figures against the committed reference run, so the two cannot drift apart.

    python bench/readme_figures.py                       # README.md against bench/results/main-job/final.json
    python bench/readme_figures.py --readme R --final F  # another pair (the tests use it)

A figure of the main job is written with a tag naming the field of `final.json` it states:

    **93.28%**<!--final:test_acc-->   220,214<!--final:params-->   9m25s<!--final:wall_s-->

The tag is invisible in the rendered page. Each tagged figure must equal the field as the README writes it
(test_acc as a percentage with two decimals, params with thousands commas, wall_s as minutes and seconds).
A line that names the main job (`make run`, "main job") may not state an accuracy (`dd.dd%`) or a parameter
count (`ddd,ddd`) without a tag, unless the figure is tagged `<!--not-final-->` (another run's figure, e.g.
the hand-made CNN's). A quoted log line `== test accuracy ...` must be the reference run's. Exit 0 when every
figure agrees, 1 naming each one that does not.

When the reference run changes (a new `make run`), copy its `final.json` and `machine.json` to
bench/results/main-job/ and edit the README's tagged figures: this check fails until both agree.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TAG = re.compile(r"(\*{0,2})([0-9][0-9.,ms]*%?)\1<!--final:(\w+)-->")
NOT_FINAL = re.compile(r"\*{0,2}[0-9][0-9.,]*%?\*{0,2}<!--not-final-->")
UNTAGGED = re.compile(r"(?<![\w.,])(\d{2}\.\d{2}%|\d{2,3},\d{3})(?![\w,])")
MAIN_JOB = re.compile(r"make run|main job", re.IGNORECASE)


def formats(final: dict) -> dict[str, str]:
    """Each checked field of final.json as the README writes it."""
    minutes, seconds = divmod(int(final["wall_s"]), 60)  # whole seconds, cut as the run's log cuts them (fmt_time)
    return {"test_acc": f"{100 * final['test_acc']:.2f}%", "params": f"{final['params']:,}",
            "wall_s": f"{minutes}m{seconds:02d}s"}


def check(readme: str, final: dict) -> list[str]:
    """The disagreements, one line each (empty: the README states the reference run)."""
    want = formats(final)
    problems, tagged = [], 0
    for n, line in enumerate(readme.splitlines(), 1):
        for m in TAG.finditer(line):
            tagged += 1
            value, field = m.group(2), m.group(3)
            if field not in want:
                problems.append(f"README line {n}: unknown field {field!r} in a final: tag (known: {', '.join(want)})")
            elif value != want[field]:
                problems.append(f"README line {n}: {value} is tagged final:{field}, the reference run has "
                                f"{want[field]}")
        if line.startswith("== test accuracy "):  # the main job's last line, quoted in a log block
            expect = f"== test accuracy {want['test_acc']}  ({want['params']} params, wall {want['wall_s']})"
            if line.rstrip() != expect:
                problems.append(f"README line {n}: the quoted log says {line.strip()!r}, the reference run's "
                                f"would say {expect!r}")
        if MAIN_JOB.search(line):
            for m in UNTAGGED.finditer(NOT_FINAL.sub("", TAG.sub("", line))):
                problems.append(f"README line {n}: {m.group(1)} on a line about the main job has no tag "
                                f"(<!--final:FIELD--> or <!--not-final-->)")
    if tagged == 0:
        problems.append("README: no tagged main-job figure at all (<!--final:test_acc--> and the like)")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--readme", default=os.path.join(ROOT, "README.md"))
    p.add_argument("--final", default=os.path.join(ROOT, "bench", "results", "main-job", "final.json"))
    args = p.parse_args(argv)
    try:
        with open(args.readme) as f:
            readme = f.read()
        with open(args.final) as f:
            final = json.load(f)
        formats(final)
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(f"readme_figures: error: cannot read {e.__class__.__name__}: {e}", file=sys.stderr)
        return 2
    problems = check(readme, final)
    for line in problems:
        print(line)
    if not problems:
        w = formats(final)
        print(f"README agrees with {os.path.relpath(args.final, ROOT)}: test accuracy {w['test_acc']}, "
              f"{w['params']} parameters, wall {w['wall_s']}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
