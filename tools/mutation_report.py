"""Mutation score per module from mutmut's results (run from the repository root after `make mutate`).

Killed = killed by a test, timed out, or caught by the type checker; every other mutant (survived, no tests,
suspicious, segfault) counts against the score. Prints a Markdown table and the survivors, for docs/mutation.md.
"""

from __future__ import annotations

import subprocess
import sys
from collections import Counter, defaultdict

KILLED = {"killed", "timeout", "caught by type check"}


def main() -> int:
    out = subprocess.run([sys.executable, "-m", "mutmut", "results", "--all", "true"], capture_output=True,
                         text=True, check=True).stdout
    counts: dict[str, Counter] = defaultdict(Counter)
    survivors: dict[str, list[str]] = defaultdict(list)
    for line in out.splitlines():
        name, _, status = line.strip().rpartition(": ")
        if not name.startswith("ppd_train."):
            continue
        module = name.split(".")[1]
        counts[module][status] += 1
        if status not in KILLED and status != "skipped":
            survivors[module].append(f"{name} ({status})")
    print("| module | mutants | killed | not killed | score |\n| --- | --- | --- | --- | --- |")
    for module, c in sorted(counts.items()):
        total = sum(c.values()) - c["skipped"]
        killed = sum(c[s] for s in KILLED)
        print(f"| `ppd_train/{module}.py` | {total} | {killed} | {total - killed} | {killed / max(total, 1):.0%} |")
    for module, names in sorted(survivors.items()):
        print(f"\n{module}:")
        for n in names:
            print(f"  {n}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
