"""Step schedules for eps_low, eps_high and the sampling temperature.

A schedule is a pure function of the optimizer step, so a resumed run reads exactly the values the
uninterrupted run would have read.

    constant   : v(t) = start
    linear     : v(t) = start + (end - start) * min(t, steps) / steps          (then stays at end)
    exp_decay  : v(t) = end + (start - end) * exp(-rate * t), end defaults to 1 (upstream GLM-TTS `dynamic_T`:
                 T(t) = 1 + (T0 - 1) * exp(-k t)); with steps > 0 the value is `end` from step `steps` on.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal


def _opt(default, help: str):  # a field with its help line (plain data: the config layer reads the metadata)
    return field(default=default, metadata={"help": help, "path": False})


def constant(value: float, step: int) -> float:
    return float(value)


def linear(start: float, end: float, steps: int, step: int) -> float:
    if steps <= 0:
        raise ValueError("linear schedule needs steps > 0")
    frac = min(max(step, 0), steps) / steps
    return start + (end - start) * frac


def exp_decay(start: float, rate: float, step: int, end: float = 1.0, steps: int = 0) -> float:
    if steps > 0 and step >= steps:
        return end
    return end + (start - end) * math.exp(-rate * max(step, 0))


@dataclass(frozen=True)
class Schedule:
    """A value that may change with the training step. A bare number in YAML means `constant`."""

    kind: Literal["constant", "linear", "exp_decay"] = _opt("constant", "constant | linear | exp_decay")
    start: float = _opt(0.0, "value at step 0")
    end: float | None = _opt(None, "linear: value reached at `steps`; exp_decay: asymptote (default 1.0)")
    steps: int = _opt(0, "linear: steps from start to end; exp_decay: step from which the value is `end` (0 = never)")
    rate: float = _opt(0.0, "exp_decay: decay rate k in exp(-k * step)")

    @classmethod
    def from_scalar(cls, value: float) -> Schedule:
        return cls(kind="constant", start=float(value))

    def validate(self, where: str) -> None:
        """ValueError naming `where` when the keys do not make a schedule of this kind."""
        if self.kind == "linear":
            if self.end is None or self.steps <= 0:
                raise ValueError(f"{where}: a linear schedule needs `end` and `steps` > 0")
        elif self.kind == "exp_decay":
            if self.rate <= 0:
                raise ValueError(f"{where}: an exp_decay schedule needs `rate` > 0")
        elif self.end is not None or self.steps or self.rate:
            raise ValueError(f"{where}: a constant schedule takes only `start`")

    def bounds(self, last_step: int) -> tuple[float, float]:
        """(lowest, highest) value the schedule takes over steps 0..last_step. Every kind is monotone between its
        breakpoints, so the extremes lie at step 0, at `last_step`, or where the schedule reaches `end`."""
        points = [0, max(last_step, 0)]
        if self.kind in ("linear", "exp_decay") and 0 < self.steps <= last_step:
            points.append(self.steps)
        values = [self(t) for t in points]
        return min(values), max(values)

    def __call__(self, step: int) -> float:
        if self.kind == "constant":
            return constant(self.start, step)
        if self.kind == "linear":
            assert self.end is not None
            return linear(self.start, self.end, self.steps, step)
        return exp_decay(self.start, self.rate, step, 1.0 if self.end is None else self.end, self.steps)

    def to_yaml(self) -> float | dict:
        """Compact form for `config show`: a constant is a bare number; other kinds list only their own keys."""
        if self.kind == "constant":
            return self.start
        keys = ("kind", "start", "end", "steps") if self.kind == "linear" else ("kind", "start", "end", "rate", "steps")
        return {k: getattr(self, k) for k in keys if getattr(self, k) is not None}

    def describe(self) -> str:
        if self.kind == "constant":
            return f"{self.start:g}"
        if self.kind == "linear":
            return f"{self.start:g} -> {self.end:g} over {self.steps} steps"
        end = 1.0 if self.end is None else self.end
        return f"{end:g} + ({self.start:g} - {end:g}) * exp(-{self.rate:g} t)"
