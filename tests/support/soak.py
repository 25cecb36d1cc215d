"""Running a Hypothesis state machine (the detection models) as a bounded test, or round after round
for a share of WATCHER_SOAK_SECONDS (`make soak`: ten minutes), fresh random histories each round."""

from __future__ import annotations

import os
import time

from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, run_state_machine_as_test


def run_machine(machine: type[RuleBasedStateMachine], examples: int, steps: int, *, derandomize: bool) -> None:
    """`examples` histories of up to `steps` rules each; `derandomize` for the bounded profile of `make test`."""
    run_state_machine_as_test(
        machine,
        settings=settings(
            max_examples=examples,
            stateful_step_count=steps,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=derandomize,
            database=None,  # a soak's histories are fresh each run, never replayed from a file
        ),
    )


def soak(machine: type[RuleBasedStateMachine], examples: int, steps: int, *, share: float = 1.0) -> tuple[int, float]:
    """Rounds of random histories for `share` of WATCHER_SOAK_SECONDS (default 600): (rounds, seconds)."""
    budget = float(os.environ.get("WATCHER_SOAK_SECONDS", "600")) * share
    started = time.monotonic()
    rounds = 0
    while time.monotonic() < started + budget:
        run_machine(machine, examples, steps, derandomize=False)
        rounds += 1
    return rounds, time.monotonic() - started
