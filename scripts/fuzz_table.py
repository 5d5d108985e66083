"""A markdown table of fuzz campaigns, one row per summary that `fuzz_readers.py --json` printed.

    python scripts/fuzz_table.py KIND.json ... > results.md

Columns: inputs, outcomes by type, crashes, hangs, silent changes, unnamed errors (ours, not
naming the file), foreign errors (any other type), memory errors, peak RSS of the worker (and
after its imports), the slowest input, and the campaign's wall time.
"""

from __future__ import annotations

import json
import os
import sys

_CLEAN = ("loaded", "CheckpointError", "crash", "hang")


def row(name: str, s: dict) -> str:
    outcomes = s["outcomes"]
    foreign = sum(n for k, n in outcomes.items() if k not in _CLEAN)
    kinds = ", ".join(f"{k} {n}" for k, n in sorted(outcomes.items()))
    cells = [name, s["inputs"], kinds, len(s["crashes"]), len(s["hangs"]), len(s["silent"]), s["unnamed_count"],
             foreign, len(s["memory"]), f"{s['peak_rss_mb']:.0f} ({s['baseline_rss_mb']:.0f})",
             f"{s['slowest_seconds'] * 1000:.0f} ms ({s['slowest_outcome']})", f"{s.get('wall_seconds', 0):.0f} s"]
    return "| " + " | ".join(map(str, cells)) + " |"


def main(paths: list[str]) -> None:
    print("| format | inputs | outcomes | crashes | hangs | silent changes | unnamed errors | foreign errors "
          "| memory errors | peak RSS MB (after import) | slowest input | wall |")
    print("|" + "---|" * 12)
    summaries = {os.path.basename(p)[: -len(".json")]: json.load(open(p)) for p in paths}
    for name, s in summaries.items():
        print(row(name, s))
    for name, s in summaries.items():
        print(f"\n**{name}**: commonest refusals (file name, numbers and quoted names as `_`):\n")
        for reason, count in list(s["reasons"].items())[:8]:
            print(f"- {count} × {reason}")
        for what in ("crashes", "hangs", "silent", "others", "unnamed", "memory"):
            if s[what]:
                print(f"- {what}: {s[what][:5]}")


if __name__ == "__main__":
    main(sys.argv[1:])
