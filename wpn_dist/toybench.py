"""Command line: ``python -m wpn_dist.toybench`` (wpn_dist/bench/toybench.py)."""
from wpn_dist.bench.toybench import main

if __name__ == "__main__":
    main()
