"""Command line: ``deepspeed wpn_dist/train.py [--config run.yaml] [--option value ...]`` (or
``python wpn_dist/train.py`` as one process). The trainer is wpn_dist/app/trainer.py."""
import os
import sys

if __package__ in (None, ""):  # run as a script: make the package importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from wpn_dist.app.trainer import main  # noqa: E402

if __name__ == "__main__":
    from wpn_dist.app.distributed import exit_now
    main()
    exit_now()
