"""A Convertr API v4 simulator for the demo, tests, benchmarks and receiver builders.

`Simulator` holds the tenant (campaigns, leads, tokens, a virtual clock, fault switches);
`SimulatorServer` serves it on loopback; `run_simulator` is the CLI's blocking entry point.

The login and port defaults live here and the rest loads on first use: every CLI command builds
the `simulate` subcommand's help from the defaults, and none but `simulate` and `demo` needs the
simulator itself (it is a tenth of a second of imports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

DEFAULT_USERNAME = "api@example.com"
DEFAULT_PASSWORD = "s3cret"
DEFAULT_PORT = 8642

if TYPE_CHECKING:
    from watcher.simulator.model import Faults, RequestRecord, Simulator
    from watcher.simulator.server import SimulatorServer, run_simulator

_LAZY = {
    "Faults": "model",
    "RequestRecord": "model",
    "Simulator": "model",
    "SimulatorServer": "server",
    "run_simulator": "server",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        from importlib import import_module

        return getattr(import_module(f"watcher.simulator.{_LAZY[name]}"), name)
    raise AttributeError(f"module 'watcher.simulator' has no attribute {name!r}")


__all__ = [
    "DEFAULT_PASSWORD",
    "DEFAULT_PORT",
    "DEFAULT_USERNAME",
    "Faults",
    "RequestRecord",
    "Simulator",
    "SimulatorServer",
    "run_simulator",
]
