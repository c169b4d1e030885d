"""Mutation score per module from mutmut's results (run from the repository root after `make mutate`).

Killed = failed a test, timed out, or rejected by mypy (part of `make test`). Survivors and mutants no test reaches
count against the score; mutants not run yet are listed apart and left out of it. Prints a Markdown table, then each
survivor with its one-line change (`--diffs`), for docs/mutation.md.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict

KILLED = {"killed", "timeout", "caught by type check"}
NOT_RUN = {"not checked", "skipped", "check was interrupted by user"}


def _mutmut(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], capture_output=True, text=True, check=True).stdout


def _change(name: str) -> str:
    """The mutated line of one mutant, as `mutmut show` prints it."""
    added = [line[1:].strip() for line in _mutmut("show", name).splitlines()
             if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else "(a line removed)"


def main() -> int:
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for line in _mutmut("results", "--all", "true").splitlines():
        name, _, status = line.strip().rpartition(": ")
        if not name.startswith("ppd_train."):
            continue
        module = name.split(".")[1]
        counts[module][status] += 1
        if status not in KILLED | NOT_RUN:
            survivors[module].append((name, status))
    print("| module | mutants | killed | by mypy | survived | no test | not run | score |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for module, c in sorted(counts.items()):
        not_run = sum(c[s] for s in NOT_RUN)
        checked = sum(c.values()) - not_run
        killed = sum(c[s] for s in KILLED)
        score = f"{killed / checked:.1%}" if checked else "-"
        print(f"| `{module}.py` | {sum(c.values())} | {killed} | {c['caught by type check']} | {c['survived']} | "
              f"{c['no tests']} | {not_run} | {score} |")
    if "--diffs" in sys.argv:
        for module, names in sorted(survivors.items()):
            print(f"\n### {module}.py")
            for name, status in names:
                print(f"- `{name.split('.', 2)[2]}` ({status}): `{_change(name)}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
