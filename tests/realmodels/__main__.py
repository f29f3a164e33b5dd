"""``python -m realmodels [names...] [--out docs/sweep.md]`` (with ``tests/`` on ``sys.path``): run the sweep and
print the table; ``make sweep`` runs every configuration and writes docs/sweep.md."""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

import torch

from .harness import configs, run_config, table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m realmodels", description=__doc__)
    parser.add_argument("names", nargs="*", help="configurations to run (default: all)")
    parser.add_argument("--out", help="also write the table (with its preamble) to this markdown file")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    todo = configs(args.names or None)
    results = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for i, config in enumerate(todo, 1):
            res = run_config(config, tmp)
            flag = "ok" if res.ok else "FAIL"
            idle = " (idle flagged)" if res.idle_flagged else ""
            print(f"[{i}/{len(todo)}] {config.name}: {flag}{idle} {res.seconds:.1f}s", file=sys.stderr, flush=True)
            if os.environ.get("SWEEP_VERBOSE"):
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
                print(f"    truth: {res.truth}; max RSS {rss} MiB", file=sys.stderr, flush=True)
            results.append(res)
    text = table(results)
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    if args.out:
        head = ""
        if os.path.exists(args.out):  # keep the method text above the table
            with open(args.out, encoding="utf-8") as fh:
                head = fh.read().split("<!-- table -->")[0]
        with open(args.out, "w", encoding="utf-8") as fh:
            fh.write(head + "<!-- table -->\n" + text)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
