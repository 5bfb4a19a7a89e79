"""Choosing one representation per layer under a byte budget: the candidates, the knapsack that
picks among them by measured error, the one-line reason shown in the report, and the budget as
users write it (``--size 1/8``, ``--target-bytes 5MB``). budget.py measures; this module decides.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..dynamics.modules import DynSpec
from ..errors import DynError


@dataclass(frozen=True)
class Candidate:
    kind: str  # "fp32" | "fp16" | "int8" | "int6" ... "int2" | "dyn" | "int4+dyn" | "int3+dyn" | "int2+dyn"
    bytes: int
    spec: DynSpec | None = None
    group: int | None = None  # group-wise kinds: inputs per fp16 scale (0: one scale per output channel)

    @property
    def label(self) -> str:
        states = f"states H={self.spec.groups} d={self.spec.dim} int8" if self.spec is not None else ""
        if self.kind == "dyn":
            return states
        if self.kind == "fp32":
            return "fp32 (kept)"
        grid = "" if self.group is None else f" g{self.group}" if self.group else " per-channel"
        return f"{self.kind[:4]}{grid} + {states}" if self.spec is not None else f"dense {self.kind}{grid}"


def allocate(options: dict[str, list[tuple[Candidate, float]]], budget: int) -> dict[str, int] | None:
    """Index of the chosen candidate per layer minimizing the summed error within ``budget`` bytes.

    Lagrangian relaxation (each layer minimizes error + lam * bytes; lam bisected to the largest
    choice that fits), then a greedy fill: the upgrade with the best error saved per extra byte
    that still fits, until none does. ``None`` when even the cheapest choices do not fit.
    """
    cheapest = sum(min(c.bytes for c, _ in opts) for opts in options.values())
    if cheapest > budget:
        return None

    def choose(lam: float) -> dict[str, int]:
        return {name: min(range(len(opts)), key=lambda i: (opts[i][1] + lam * opts[i][0].bytes, opts[i][0].bytes))
                for name, opts in options.items()}

    def total(choice) -> int:
        return sum(options[n][i][0].bytes for n, i in choice.items())

    lo, hi = 0.0, 1.0
    while total(choose(hi)) > budget:
        hi *= 4
        if hi > 1e30:
            break
    for _ in range(100):
        mid = math.sqrt(lo * hi) if lo > 0 else hi / 1e6 if hi > 1e-300 else 0.0
        if total(choose(mid)) > budget:
            lo = mid
        else:
            hi = mid
        if lo > 0 and hi / lo < 1 + 1e-9:
            break
    choice = choose(hi)
    if total(choice) > budget:  # hi can overshoot only through ties; fall back to the cheapest
        choice = {n: min(range(len(o)), key=lambda i: o[i][0].bytes) for n, o in options.items()}
    spent = total(choice)
    while True:
        best = None
        for name, opts in options.items():
            cur_c, cur_e = opts[choice[name]]
            for i, (c, e) in enumerate(opts):
                extra = c.bytes - cur_c.bytes
                if e < cur_e and extra > 0 and spent + extra <= budget:
                    gain = (cur_e - e) / extra
                    if best is None or gain > best[0]:
                        best = (gain, name, i, extra)
        if best is None:
            return choice
        _, name, i, extra = best
        choice[name] = i
        spent += extra


def why(opts: list[tuple[Candidate, float]], chosen: int) -> str:
    """One line: the choice against its cheaper and dearer neighbours."""
    c, e = opts[chosen]
    cheaper = [(o, oe) for o, oe in opts if o.bytes < c.bytes]
    if not cheaper:
        return "cheapest option"
    o, oe = max(cheaper, key=lambda t: t[0].bytes)
    return f"{o.label} would save {c.bytes - o.bytes:,} B for +{oe - e:.3g} measured error"


def parse_size(text: str) -> float:
    """``1/8``, ``0.125`` or ``12.5%`` -> 0.125."""
    t = text.strip()
    try:
        if t.endswith("%"):
            value = float(t[:-1]) / 100
        elif "/" in t:
            a, b = t.split("/", 1)
            value = float(a) / float(b)
        else:
            value = float(t)
    except (ValueError, ZeroDivisionError):
        raise DynError(f"--size {text!r}: give a fraction of the original bytes such as 1/8, 0.125 or 12.5%") from None
    if not 0 < value < 1:
        raise DynError(f"--size {text!r} must be between 0 and 1 (a fraction of the original's bytes)")
    return value


MAX_BYTES = 2**60


def parse_bytes(text: str) -> int:
    """``5MB``, ``800kB``, ``1.5MiB`` or a plain byte count."""
    units = {"": 1, "b": 1, "kb": 1000, "mb": 1000**2, "gb": 1000**3, "kib": 1024, "mib": 1024**2, "gib": 1024**3}
    t = text.strip().lower().replace(" ", "")
    i = len(t)
    while i and not t[i - 1].isdigit() and t[i - 1] != ".":
        i -= 1
    try:
        value = float(t[:i]) * units[t[i:]]
    except (ValueError, KeyError):
        raise DynError(f"--target-bytes {text!r}: give a size such as 5MB, 800kB or 1500000") from None
    if not value >= 1:
        raise DynError(f"--target-bytes {text!r} must be positive")
    if not math.isfinite(value) or value > MAX_BYTES:  # int(inf) raises; no file is an exabyte
        raise DynError(f"--target-bytes {text!r} is more than any model needs; give a size such as 5MB")
    return int(value)
