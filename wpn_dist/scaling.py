"""Command line: ``python -m wpn_dist.scaling`` (wpn_dist/bench/scaling/study.py)."""
from wpn_dist.bench.scaling.study import main

if __name__ == "__main__":
    main()
