"""Command line: ``python -m wpn_dist.memory`` (wpn_dist/bench/memory.py)."""
import sys

from wpn_dist.bench.memory import main

if __name__ == "__main__":
    sys.exit(main())
