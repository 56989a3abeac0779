"""Command line: ``deepspeed wpn_dist/train.py [--config run.yaml] [--option value ...]`` (or
``python wpn_dist/train.py`` as one process; ``torchrun``, ``accelerate launch`` and ``srun`` start
it too; installed, the same command is ``wpn-train``). The trainer is wpn_dist/app/trainer.py."""
import os
import sys

if __package__ in (None, ""):  # run as a script: make the package importable from the checkout
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main() -> None:
    """The ``wpn-train`` console script and ``python wpn_dist/train.py``: train, then leave with
    exit_now (wpn_dist/app/distributed.py): C++ destructors run at interpreter exit can abort a CPU
    rank whose work is done (status -6), and the launcher would report the whole run as failed."""
    from wpn_dist.app.distributed import exit_now
    from wpn_dist.app.trainer import main as train
    train()
    exit_now()


if __name__ == "__main__":
    main()
