"""Fault injection for the tests of crash safety: WPN_DIST_FAULT=<name>:<step> triggers the named
fault at that step. Unset (always, outside tests) it does nothing."""
import os


def injected(name: str, step: int) -> bool:
    return os.environ.get("WPN_DIST_FAULT", "") == f"{name}:{step}"


def crash_if_injected(name: str, step: int) -> None:
    """Die at once, as a killed process would: no cleanup, no exception handlers."""
    if injected(name, step):
        os._exit(17)
