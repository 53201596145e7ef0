"""Stated distributions for the model's random inputs (queue waits, file durations, walltimes).

A distribution is written as text so a result can say exactly what it assumed:

    fixed:2           always 2 s
    uniform:1,3       between 1 and 3 s
    exp:mean=60       exponential with that mean
    lognormal:median=120,sigma=1.0   log-normal: exp(N(ln median, sigma))

Every draw comes from a `random.Random` the caller seeds, so one seed gives one history.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass


class DistError(ValueError):
    """A distribution string that cannot be parsed (the CLI prints it as one line)."""


@dataclass(frozen=True)
class Dist:
    """A non-negative random duration in seconds."""

    kind: str
    a: float
    b: float = 0.0

    def sample(self, rng: random.Random) -> float:
        """One draw."""
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return rng.uniform(self.a, self.b)
        if self.kind == "exp":
            return rng.expovariate(1.0 / self.a) if self.a > 0 else 0.0
        return rng.lognormvariate(math.log(self.a), self.b)

    @property
    def mean(self) -> float:
        """Expected value (used to size runs, never to replace draws)."""
        if self.kind == "fixed" or self.kind == "exp":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        return self.a * math.exp(self.b ** 2 / 2)

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"fixed:{self.a:g}"
        if self.kind == "uniform":
            return f"uniform:{self.a:g},{self.b:g}"
        if self.kind == "exp":
            return f"exp:mean={self.a:g}"
        return f"lognormal:median={self.a:g},sigma={self.b:g}"


def fixed(seconds: float) -> Dist:
    """A constant duration."""
    return Dist("fixed", float(seconds))


def parse_dist(text: str) -> Dist:
    """Parse `kind:args` (see the module docstring); raises DistError with a readable reason."""
    kind, _, args = text.strip().partition(":")
    kind = kind.strip().lower()
    try:
        if kind == "fixed":
            values = [float(args)]
        elif kind == "uniform":
            values = [float(v) for v in args.split(",")]
            if len(values) != 2 or values[0] > values[1]:
                raise DistError(f"uniform needs LOW,HIGH with LOW <= HIGH, got {args!r}")
        elif kind in ("exp", "lognormal"):
            fields = dict(part.split("=", 1) for part in args.split(",") if part)
            names = ["mean"] if kind == "exp" else ["median", "sigma"]
            if sorted(fields) != sorted(names):
                raise DistError(f"{kind} needs {','.join(n + '=...' for n in names)}, got {args!r}")
            values = [float(fields[n]) for n in names]
            if kind == "lognormal" and values[0] <= 0:
                raise DistError(f"lognormal median must be > 0, got {values[0]:g}")
        else:
            raise DistError(f"unknown distribution {kind!r} (fixed, uniform, exp, lognormal)")
    except ValueError as exc:
        if isinstance(exc, DistError):
            raise
        raise DistError(f"bad numbers in distribution {text!r}") from None
    if any(v < 0 or math.isnan(v) or math.isinf(v) for v in values):
        raise DistError(f"distribution {text!r}: values must be finite and >= 0")
    return Dist(kind, *values)
