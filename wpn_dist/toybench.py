"""Command line: ``python -m wpn_dist.toybench``, installed also ``wpn-toybench``
(wpn_dist/bench/toybench.py)."""


def main() -> None:
    from wpn_dist.app.kernels import pin_toy_kernels
    pin_toy_kernels()  # re-executes with fixed CPU kernels; the ranks it launches inherit them
    from wpn_dist.bench.toybench import main as toybench
    toybench()


if __name__ == "__main__":
    main()
