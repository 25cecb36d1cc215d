"""A Convertr API v4 simulator for the demo, tests, benchmarks and receiver builders.

`Simulator` holds the tenant (campaigns, leads, tokens, a virtual clock, fault switches);
`SimulatorServer` serves it on loopback; `run_simulator` is the CLI's blocking entry point.
"""

from watcher.simulator.model import (
    DEFAULT_PASSWORD,
    DEFAULT_PORT,
    DEFAULT_USERNAME,
    Faults,
    RequestRecord,
    Simulator,
)
from watcher.simulator.server import SimulatorServer, run_simulator

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
