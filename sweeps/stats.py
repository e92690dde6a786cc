"""Statistics of the summary: means over seeds with t intervals, paired-t and Wilcoxon p-values,
equivalence tests (TOST), the smallest detectable difference and Holm's adjustment, from scipy.
Imported by summary (and so by figures and cli); it imports scipy only."""

import dataclasses
import math

from scipy import stats


def t_975(df):
    """t(0.975, df): the half-width of a 95% interval is this many standard errors."""
    return float(stats.t.ppf(0.975, df))


@dataclasses.dataclass
class MeanCI:
    """Mean over n values with sample standard deviation, 95% t-interval and the two-sided p-value
    of a one-sample t-test of mean 0 (for a paired difference: the paired t-test); nan for n <
    2."""

    n: int
    mean: float
    sd: float
    low: float
    high: float
    p: float = math.nan

    @classmethod
    def of(cls, values, bounds=(-math.inf, math.inf)):
        """The interval is cut to `bounds`, the metric's possible range: with few seeds t is large,
        and an accuracy interval of 2 seeds can pass 100%."""
        n = len(values)
        mean = sum(values) / n
        if n < 2:
            return cls(n, mean, math.nan, math.nan, math.nan)
        sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
        half_width = t_975(n - 1) * sd / math.sqrt(n)
        p = float(mean == 0)
        if sd > 0:
            p = 2 * float(stats.t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))
        low, high = max(bounds[0], mean - half_width), min(bounds[1], mean + half_width)
        return cls(n, mean, sd, low, high, p)

    def text(self, digits=4):
        """("mean ± sd", "[low, high]") for tables; one value has no spread."""
        if self.n < 2:
            return f"{self.mean:.{digits}f}", "n/a"
        return (f"{self.mean:.{digits}f} ± {self.sd:.{digits}f}",
                f"[{self.low:.{digits}f}, {self.high:.{digits}f}]")


def holm(p_values):
    """Holm's step-down adjustment of m p-values (nan ones left out of m): the k-th smallest times
    m - k + 1, never below the one before it, at most 1. It holds the chance of any false
    finding among them to 5% at an adjusted 0.05, whatever their dependence."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, i) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[i] = running
    return adjusted


def wilcoxon_p(differences):
    """The two-sided p-value of Wilcoxon's signed-rank test of paired differences centred on 0
    (scipy's exact distribution for few pairs without ties); nan under 2 pairs or where every
    difference is 0."""
    if len(differences) < 2 or not any(differences):
        return math.nan
    return float(stats.wilcoxon(differences).pvalue)


def tost_p(differences, margin):
    """Two one-sided t-tests of equivalence: the larger of the p-values that the mean lies above
    -margin and below +margin. Under 0.05, a difference larger than the margin either way is
    rejected at 5% (the 90% t interval lies inside the margin); nan under 2 values."""
    n = len(differences)
    if n < 2:
        return math.nan
    mean = sum(differences) / n
    se = math.sqrt(sum((d - mean) ** 2 for d in differences) / (n - 1) / n)
    if se == 0:
        return 0.0 if abs(mean) < margin else 1.0
    return max(float(stats.t.sf((mean + margin) / se, n - 1)),
               float(stats.t.sf((margin - mean) / se, n - 1)))


def detectable(sd, n, power=0.8):
    """The smallest true mean difference that a two-sided paired t-test at 5% detects with this
    power, for paired differences of standard deviation sd over n pairs (the normal
    approximation with t quantiles)."""
    return (t_975(n - 1) + float(stats.t.ppf(power, n - 1))) * sd / math.sqrt(n)
