"""Command line: ``python -m wpn_dist.evaluate`` (wpn_dist/app/evaluation.py)."""
from wpn_dist.app.evaluation import main

if __name__ == "__main__":
    from wpn_dist.app.distributed import exit_now
    main()
    exit_now()
