"""How ``pipeline.run_all`` walks its step table: a step's declaration, and the timer and check gate.

A ``Step`` names the Dagster asset it backs, the assets it reads and the blocking checks it applies, so
the plain run order can be compared with the asset graph (``tests/assets/test_pipeline_order.py``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

from melanoma_ml.config import PipelineConfig
from melanoma_ml.errors import InputStateError

T = TypeVar("T")


class PipelineCheckFailed(InputStateError):
    """A quality check between two steps failed; later steps would build on bad input."""


@dataclass(frozen=True)
class Step:
    """One step of the run order, named after the Dagster asset it backs.

    Attributes:
        name: The asset (``evaluation`` stands for every ``evaluation/<backbone>`` asset).
        inputs: The assets it reads: the asset's Dagster upstream assets.
        run: ``run(StepRun, **reads)`` -> the step's result, for every backbone/fold when the asset is
            one per backbone or partitioned.
        checks: The blocking asset checks ``run`` applies: name -> the other assets the check reads.
        also_writes: Further assets the same call materializes (a Dagster multi-asset).
    """

    name: str
    inputs: tuple[str, ...]
    run: Callable[..., Any]
    checks: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    also_writes: tuple[str, ...] = ()

    @property
    def reads(self) -> tuple[str, ...]:
        """Every asset ``run`` is given: the inputs, then what the checks read besides."""
        extra = (name for names in self.checks.values() for name in names)
        return tuple(dict.fromkeys([*self.inputs, *extra]))


class StepRun:
    """One run: times each call as a named step (progress lines, ``seconds``) and stops on a failed check."""

    def __init__(self, config: PipelineConfig, progress: Callable[[str], Any]) -> None:
        self.config, self.progress = config, progress
        self.seconds: dict[str, float] = {}

    def step(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``fn(*args, **kwargs)``, timed under ``name`` (repeated names add up)."""
        self.progress(f"[{name}] ...")
        started = time.perf_counter()
        value = fn(*args, **kwargs)
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - started
        self.progress(f"[{name}] done in {time.perf_counter() - started:.1f} s")
        return value

    def check(self, name: str, fn: Callable[..., Any], *args: Any, where: str = "") -> None:
        """Run check ``fn`` (problems, or ``(problems, evidence)``) as a step.

        Raises:
            PipelineCheckFailed: it found problems (they are named), as the blocking asset check would.
        """
        label = f"{name} {where}".strip()
        outcome = self.step(f"check {label}", fn, *args)
        problems = outcome[0] if isinstance(outcome, tuple) else outcome
        if problems:
            raise PipelineCheckFailed(f"check {label} failed: " + "; ".join(map(str, problems)))


def one_call(label: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    """A ``Step.run`` that is one timed call, ``fn(config, *reads)`` under ``label``."""
    return lambda run, **reads: run.step(label, fn, run.config, *reads.values())
