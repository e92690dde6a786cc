"""Statistics of the summary: means over seeds with t intervals, paired-t p-values and Holm's adjustment, from
scipy's t distribution. Imported by summary (and so by figures and cli); it imports scipy only."""

from __future__ import annotations

import dataclasses
import math

from scipy import stats


def t_975(df: int) -> float:
    """t(0.975, df): the half-width of a 95% interval is this many standard errors."""
    return float(stats.t.ppf(0.975, df))


@dataclasses.dataclass
class MeanCI:
    """Mean over n values with sample standard deviation, 95% t-interval and the two-sided p-value of a
    one-sample t-test of mean 0 (for a paired difference: the paired t-test); nan for n < 2."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    p: float = math.nan

    @classmethod
    def of(cls, values: list[float], bounds: tuple[float, float] = (-math.inf, math.inf)) -> MeanCI:
        """The interval is cut to `bounds`, the metric's possible range: with few seeds t is large, and an
        accuracy interval of 2 seeds can pass 100%."""
        n = len(values)
        mean = sum(values) / n
        if n < 2:
            return cls(n, mean, math.nan, math.nan, math.nan)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half_width = t_975(n - 1) * sd / math.sqrt(n)
        p = 2 * float(stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1)) if sd > 0 else float(mean == 0) or 0.0
        return cls(n, mean, sd, max(bounds[0], mean - half_width), min(bounds[1], mean + half_width), p)

    def text(self, digits: int = 4) -> tuple[str, str]:
        """("mean ± sd", "[low, high]") for tables; one value has no spread."""
        if self.n < 2:
            return f"{self.mean:.{digits}f}", "n/a"
        return f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}", f"[{self.low:.{digits}f}, {self.high:.{digits}f}]"


def holm(p_values: list[float]) -> list[float]:
    """Holm's step-down adjustment of m p-values (nan ones left out of m): the k-th smallest times m - k + 1,
    never below the one before it, at most 1. It holds the chance of any false finding among them to 5% at
    an adjusted 0.05, whatever their dependence."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted
