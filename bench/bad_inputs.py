"""The hardening issue's measurement: run the catalogue of bad inputs (``tests/catalogue.py``) and
count what happened -- cases tried, clear errors, untouched models and files, worst time to the
error (after imports).

    python bench/bad_inputs.py [--json bench/results/bad_inputs.json]
"""

from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
from pathlib import Path

from _common import environment, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the catalogue lives in tests/
from tests.catalogue import Ctx, cases  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default="bench/results/bad_inputs.json")
    args = ap.parse_args(argv)
    import autoquant  # noqa: F401 - imports are not counted in the times below

    ctx = Ctx(Path(tempfile.mkdtemp(prefix="bad-inputs-")))
    rows, by_kind = [], collections.defaultdict(lambda: [0, 0, 0])
    start = time.perf_counter()
    for case in cases():
        outcome = case.run(ctx)
        rows.append({"case": case.id, "kind": case.kind, "clear": outcome.clear,
                     "untouched": outcome.untouched, "seconds": outcome.seconds,
                     "message": outcome.message[:300]})
        k = by_kind[case.kind]
        k[0] += 1
        k[1] += outcome.clear
        k[2] += outcome.untouched
        if not (outcome.clear and outcome.untouched):
            print(f"FAILED {case.id}: {outcome.message[:200]}", flush=True)
    worst = max(rows, key=lambda r: r["seconds"])
    summary = {"cases": len(rows), "clear_errors": sum(r["clear"] for r in rows),
               "untouched": sum(r["untouched"] for r in rows),
               "tracebacks": sum(r["message"].startswith("raw ") for r in rows),
               "worst_seconds": worst["seconds"], "worst_case": worst["case"],
               "wall_s": time.perf_counter() - start}
    for kind, (n, clear, untouched) in by_kind.items():
        print(f"{kind:9s} {n:4d} cases, {clear:4d} clear, {untouched:4d} untouched")
    print(f"total     {summary['cases']:4d} cases, {summary['clear_errors']:4d} clear errors, "
          f"{summary['untouched']:4d} untouched, {summary['tracebacks']} tracebacks; worst "
          f"{summary['worst_seconds']:.2f} s to the error ({summary['worst_case']})")
    write_json(args.json, {"environment": environment(), "summary": summary, "cases": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
