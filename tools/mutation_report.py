"""Mutation scores per module from mutmut's results (run from the repository root after `make mutate`).

Two shares, kept apart: **by mypy**, the share of the judged mutants the type checker rejects (mutmut's exit code 37,
"caught by type check"; mypy is part of `make test`), and **by tests**, the share of the mutants mypy lets through
that a test kills (a test fails or times out). Survivors and mutants no test reaches count against the tests' share;
mutants not run yet are listed apart and left out of both. "Either" is the two together (the score of earlier
rounds). Prints a Markdown table, then each survivor with its one-line change (`--diffs`), for docs/mutation.md.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict

BY_TESTS = {"killed", "timeout"}
BY_MYPY = "caught by type check"
KILLED = BY_TESTS | {BY_MYPY}
NOT_RUN = {"not checked", "skipped", "check was interrupted by user"}


def _mutmut(*args: str) -> str:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], capture_output=True, text=True, check=True).stdout


def _change(name: str) -> str:
    """The mutated line of one mutant, as `mutmut show` prints it."""
    added = [line[1:].strip() for line in _mutmut("show", name).splitlines()
             if line.startswith("+") and not line.startswith("+++")]
    return added[0] if added else "(a line removed)"


def shares(c: Counter) -> dict[str, float | None]:
    """Per module: the share mypy rejects (of the judged mutants), the share the tests kill (of those mypy lets
    through) and both together; None where there is nothing to divide by."""
    judged = sum(c.values()) - sum(c[s] for s in NOT_RUN)
    tested = judged - c[BY_MYPY]
    by_tests = sum(c[s] for s in BY_TESTS)

    def share(n: int, of: int) -> float | None:
        return n / of if of else None

    return {"by_mypy": share(c[BY_MYPY], judged), "by_tests": share(by_tests, tested),
            "either": share(by_tests + c[BY_MYPY], judged)}


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


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
    print("| module | mutants | by mypy | tested | killed by tests | survived | no test | not run | by mypy % | "
          "by tests % | either % |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for module, c in sorted(counts.items()):
        not_run = sum(c[s] for s in NOT_RUN)
        tested = sum(c.values()) - not_run - c[BY_MYPY]
        sh = shares(c)
        print(f"| `{module}.py` | {sum(c.values())} | {c[BY_MYPY]} | {tested} | {sum(c[s] for s in BY_TESTS)} | "
              f"{c['survived']} | {c['no tests']} | {not_run} | {_pct(sh['by_mypy'])} | {_pct(sh['by_tests'])} | "
              f"{_pct(sh['either'])} |")
    if "--diffs" in sys.argv:
        for module, names in sorted(survivors.items()):
            print(f"\n### {module}.py")
            for name, status in names:
                print(f"- `{name.split('.', 2)[2]}` ({status}): `{_change(name)}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
