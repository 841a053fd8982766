"""The statistics of a projection: one formula (`ProjStats`), one set of logged names
(`METRIC_PREFIX` + `STAT_FIELDS`, TRL-style `vhack/...`), and the window that averages them
between two log records (`ProjStatsWindow`). Used by the Projector, the sharded projector,
VHackCallback, the GRPO trainer and vhack.validate.

Per module (raw [M, 4]: |c|, |relu(c)|, |g| before, |g| after, c = V g):
  cin            |relu(c)| / |g| (one-sided, "hack-ward"), or |c| / |g| (two-sided); 0 for a zero
                 gradient and for modules without basis rows; NaN for a non-finite gradient.
Per projection (what is logged):
  cin_mean            mean cin over the projected modules (k > 0) with a non-zero gradient: the
                      one-sided cin for modes hackward and measure (so a measure-only baseline
                      and a projected run log the same statistic), two-sided for both/reverse
  cin_mean_two_sided  the same mean of |c| / |g|, whatever the mode
  fired               fraction of those modules with cin > FIRED_THRESHOLD
  energy_removed      1 - sum |g after|^2 / sum |g before|^2 over all modules
  energy_hackward     sum over projected modules of |relu(c)|^2 / sum |g before|^2
  norm_before, norm_after   global |g| before and after
On a zero gradient (a step where no group had reward variance) the ratios are undefined (NaN in
ProjStats); `ProjStatsWindow` leaves such steps out of its averages and counts them instead
(`vhack/skipped_steps`), so the log stays NaN-free. A non-finite gradient stays visible as NaN.
"""

from __future__ import annotations

from functools import cached_property

import torch

__all__ = [
    "FIRED_THRESHOLD",
    "METRIC_PREFIX",
    "ONE_SIDED_MODES",
    "STAT_FIELDS",
    "ProjStats",
    "ProjStatsWindow",
    "cin",
    "cin_mean",
    "mean_over_steps_with_gradient",
]

METRIC_PREFIX = "vhack/"
STAT_FIELDS = (
    "cin_mean",
    "cin_mean_two_sided",
    "fired",
    "energy_removed",
    "energy_hackward",
    "norm_before",
    "norm_after",
)
FIRED_THRESHOLD = 1e-6
# Modes whose cin is the one-sided (hack-ward) one: what hackward removes, and what a measure-only
# baseline logs so its curve compares directly with a projected run's.
ONE_SIDED_MODES = ("hackward", "measure")


def cin(raw: torch.Tensor, one_sided: bool) -> torch.Tensor:
    """cin of every module from projection statistics raw [..., M, 4] (|Vg|, |relu(Vg)|, |g|
    before, after) -> [..., M]: |relu(Vg)| / |g| (one-sided, "hackward") or |Vg| / |g|; 0 where
    |g| = 0; NaN stays NaN. The one definition used by ProjStats and vhack.validate."""
    num = raw[..., 1] if one_sided else raw[..., 0]
    g = raw[..., 2]
    return torch.where(g == 0, torch.zeros_like(g), num / g)


def cin_mean(raw: torch.Tensor, covered: torch.Tensor, one_sided: bool) -> torch.Tensor:
    """Unweighted mean of `cin` over the modules that count: covered by the basis (bool [M], k > 0)
    and with a non-zero gradient -> [...] float32 (NaN when no module counts; a NaN gradient stays
    visible as NaN). Modules without a gradient carry no direction and are left out."""
    counts = covered & (raw[..., 2] != 0)
    values = torch.where(counts, cin(raw, one_sided), torch.zeros_like(raw[..., 2]))
    return values.sum(-1) / counts.sum(-1)


class ProjStats:
    """Statistics of one projection, kept on the device until a field is read.

    raw [M, 4] float32: |Vg|, |relu(Vg)|, |g| before, |g| after per module (for an update, g is
    -Delta). projected: bool [M] on raw's device, the module has basis rows (k > 0). one_sided:
    which cin `cin`, `cin_mean` and `fired` use (the Projector passes mode in ONE_SIDED_MODES).
    The fields are defined in the module docstring (`vhack.projstats`); cin [M] is per module.
    Reading a float field, nonfinite or as_dict() synchronises once; raw, cin and summary() do not.
    """

    def __init__(
        self, names: list[str], raw: torch.Tensor, projected: torch.Tensor, one_sided: bool
    ) -> None:
        self.names = names
        self.raw = raw
        self.projected = projected
        self.one_sided = one_sided

    @cached_property
    def cin(self) -> torch.Tensor:
        """[M] float32 on the device."""
        return cin(self.raw, self.one_sided)

    def summary(self) -> torch.Tensor:
        """float32 [len(STAT_FIELDS)] on the device, in STAT_FIELDS order (no synchronisation)."""
        raw = self.raw.float()
        counts = self.projected & (raw[:, 2] != 0)
        fired = (counts & (self.cin > FIRED_THRESHOLD)).sum() / counts.sum()
        mean = cin_mean(raw, self.projected, self.one_sided)
        two_sided = cin_mean(raw, self.projected, one_sided=False)
        before_sq, after_sq = raw[:, 2:4].square().sum(0)
        hackward_sq = torch.where(self.projected, raw[:, 1], 0.0).square().sum()
        fields = [
            mean,
            two_sided,
            fired,
            1 - after_sq / before_sq,
            hackward_sq / before_sq,
            before_sq.sqrt(),
            after_sq.sqrt(),
        ]
        return torch.stack([f.float() for f in fields])

    @cached_property
    def _values(self) -> dict[str, float]:
        return dict(zip(STAT_FIELDS, self.summary().tolist(), strict=True))  # one sync

    @property
    def cin_mean(self) -> float:
        return self._values["cin_mean"]

    @property
    def cin_mean_two_sided(self) -> float:
        return self._values["cin_mean_two_sided"]

    @property
    def fired(self) -> float:
        return self._values["fired"]

    @property
    def energy_removed(self) -> float:
        """Share of the gradient's squared norm the projection removed (NaN for a zero gradient;
        0 in measure mode)."""
        return self._values["energy_removed"]

    @property
    def energy_hackward(self) -> float:
        """Share of the gradient's squared norm on the hack-ward side of the basis."""
        return self._values["energy_hackward"]

    @property
    def has_gradient(self) -> bool:
        """False for a zero gradient (every ratio undefined): a step ProjStatsWindow skips."""
        return self._values["norm_before"] != 0

    def all_finite(self) -> bool:
        """True when every module's gradient and coefficients were finite."""
        return bool(torch.isfinite(self.raw[:, [0, 2]]).all())

    @property
    def nonfinite(self) -> list[str]:
        """Names of the modules whose gradient (or coefficients) were not finite: left untouched."""
        bad = ~torch.isfinite(self.raw[:, [0, 2]]).all(1)
        return [self.names[i] for i in bad.nonzero().flatten().tolist()]

    def as_dict(self) -> dict[str, float]:
        """{field: value} for every STAT_FIELDS entry (unprefixed; loggers add METRIC_PREFIX)."""
        return dict(self._values)

    def __repr__(self) -> str:
        return (
            f"ProjStats({len(self.names)} modules, cin_mean={self.cin_mean:.4g}, "
            f"fired={self.fired:.3g})"
        )


class ProjStatsWindow:
    """Averages ProjStats over the optimizer steps between two log records.

    add(stats) once per optimizer step (None: no gradient reached dS). Steps with a zero gradient
    (or None) are counted, not averaged: their ratios are undefined, and averaging them as 0 or
    NaN would bias or blank the whole window. pop() returns {"vhack/<field>": mean over the steps
    that had a gradient, ..., "vhack/skipped_steps": count} and resets; {} when nothing was added;
    only the count when every step was skipped. A non-finite gradient stays visible as NaN.
    """

    def __init__(self) -> None:
        self._sums = torch.zeros(len(STAT_FIELDS), dtype=torch.float64)
        self._count = 0
        self._skipped = 0

    def __len__(self) -> int:
        """Steps added since the last pop (with or without a gradient)."""
        return self._count + self._skipped

    def add(self, stats: ProjStats | None) -> None:
        if stats is None or not stats.has_gradient:
            self._skipped += 1
            return
        values = stats.as_dict()
        self._sums += torch.tensor([values[f] for f in STAT_FIELDS], dtype=torch.float64)
        self._count += 1

    def pop(self) -> dict[str, float]:
        if len(self) == 0:
            return {}
        out = {}
        if self._count:
            means = (self._sums / self._count).tolist()
            out = {METRIC_PREFIX + f: v for f, v in zip(STAT_FIELDS, means, strict=True)}
        out[METRIC_PREFIX + "skipped_steps"] = float(self._skipped)
        self._sums.zero_()
        self._count = self._skipped = 0
        return out


def mean_over_steps_with_gradient(summaries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`ProjStatsWindow`'s average on the device: summaries [n, len(STAT_FIELDS)] (stacked
    ProjStats.summary() of n optimizer steps) -> (mean over the steps with a non-zero gradient
    [len(STAT_FIELDS)], NaN where there is none; number of steps without one, int64 []). No
    synchronisation."""
    has_gradient = summaries[:, STAT_FIELDS.index("norm_before")] != 0
    kept = torch.where(has_gradient[:, None], summaries, torch.zeros_like(summaries))
    return kept.sum(0) / has_gradient.sum(), (~has_gradient).sum()
