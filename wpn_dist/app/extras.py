"""Optional features and the setup.py extra that installs each. A command that will need one checks
at its start, before any work, and stops with one line naming the extra (exit 2), never after the
work is done."""
import importlib
import sys

# extra -> (the module a feature imports, the requirement setup.py's extras_require lists)
EXTRAS = {
    "bench": ("matplotlib", "matplotlib>=3.7"),
    "lmeval": ("lm_eval", "lm-eval>=0.4.5"),
}


def missing_extra(extra: str, needed_by: str, alternative: str | None = None) -> str | None:
    """None when the extra's module imports; else the one-line message: ``needed_by`` (e.g. "plots
    need"), the module, how to install it, and ``alternative`` (e.g. "pass --no_plots") when there
    is a way to do without."""
    module, requirement = EXTRAS[extra]
    try:
        importlib.import_module(module)
        return None
    except ImportError:
        pass
    message = (f"{needed_by} {module}, from the [{extra}] extra: pip install \"{requirement}\" "
               f"(or, in the checkout, pip install -e \".[{extra}]\")")
    return message + (f"; or {alternative}" if alternative else "")


def require_extra(extra: str, needed_by: str, alternative: str | None = None, prog: str = "wpn_dist") -> None:
    """Stop with ``<prog>: error: <missing_extra's line>`` and exit status 2 when the extra is missing."""
    message = missing_extra(extra, needed_by, alternative)
    if message:
        print(f"{prog}: error: {message}", file=sys.stderr, flush=True)
        sys.exit(2)
