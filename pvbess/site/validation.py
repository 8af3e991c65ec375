"""Checks on time series once they are in memory: hard errors and plausibility warnings.

Row numbers in messages are 1-based positions in the series (row 1 = first value).
"""

from __future__ import annotations

import warnings
from typing import NoReturn

import numpy as np
import pandas as pd

from pvbess import errors

__all__ = ["PlausibilityWarning", "check_pv_plausibility", "check_series"]

HOURS_PER_YEAR = 8760.0
# Specific yield [kWh/kWp/yr] = plane-of-array irradiation [kWh/m²/yr] / 1 kW/m² (STC)
# x performance ratio (< 1). 2,000 needs roughly 2,400 kWh/m²/yr at a good PR, found only
# in the sunniest deserts; the Peruvian jungle receives about 1,640-1,830 kWh/m²/yr.
MAX_SPECIFIC_YIELD_KWH_PER_KWP_YR = 2000.0
# Relative slack on the AC rating so that float noise in an exactly clipped series
# (1670.0000000001 kW) does not warn.
_AC_TOLERANCE_FRAC = 1e-6


class PlausibilityWarning(UserWarning):
    """Data are readable but physically doubtful; results built on them may mislead."""


def _fail(source: str, column: str, problem: str, index: pd.Index, pos: int | None) -> NoReturn:
    errors.fail(
        source,
        column,
        problem,
        row=None if pos is None else pos + 1,
        where="" if pos is None else f"row {pos + 1} of {len(index)} (time {index[pos]})",
        time=None if pos is None else str(index[pos]),
    )


def _first(mask: np.ndarray) -> int | None:
    hits = np.flatnonzero(mask)
    return int(hits[0]) if len(hits) else None


def _step_of(index: pd.DatetimeIndex | None) -> pd.Timedelta | None:
    if index is None or len(index) < 2:
        return None
    return pd.Timedelta(index[1] - index[0])


def _check_index(
    index: pd.DatetimeIndex, source: str, column: str, step: pd.Timedelta | None
) -> None:
    """Unique, increasing timestamps at a constant step (``step``, else the most common)."""
    dup = _first(index.duplicated())
    if dup is not None:
        _fail(source, column, "duplicate timestamp.", index, dup)
    if len(index) < 2:
        return
    diffs = np.asarray(index[1:] - index[:-1])
    back = _first(diffs < np.timedelta64(0))
    if back is not None:
        _fail(
            source,
            column,
            "timestamps are not increasing (earlier than the row before).",
            index,
            back + 1,
        )
    if step is None:
        values, counts = np.unique(diffs, return_counts=True)
        step = pd.Timedelta(values[np.argmax(counts)])
    gap = _first(diffs != step.to_timedelta64())
    if gap is not None:
        _fail(
            source,
            column,
            f"gap or irregular spacing: the next time, {index[gap + 1]}, is "
            f"{pd.Timedelta(diffs[gap])} later; expected {step}.",
            index,
            gap,
        )


def check_series(
    values: pd.Series,
    *,
    source: str,
    column: str,
    expected_index: pd.DatetimeIndex | None = None,
    allow_negative: bool = False,
) -> None:
    """Raise DataError unless ``values`` is a clean, finite, gap-free time series.

    Checks, in order: a DatetimeIndex, the length and timestamps of ``expected_index``
    (if given), duplicated/unordered/irregular timestamps, NaN, inf and (unless
    ``allow_negative``) negative values. The message names ``source``, ``column``
    and the first offending row (1-based position) and time.
    """
    index = values.index
    if not isinstance(index, pd.DatetimeIndex):
        _fail(source, column, f"index is {type(index).__name__}, not timestamps.", index, None)
    if expected_index is not None and len(values) != len(expected_index):
        _fail(
            source,
            column,
            f"{len(values)} values, expected {len(expected_index)} "
            f"({expected_index[0]} to {expected_index[-1]}).",
            index,
            None,
        )
    _check_index(index, source, column, _step_of(expected_index))
    if expected_index is not None:
        moved = _first(np.asarray(index != expected_index))
        if moved is not None:
            _fail(
                source,
                column,
                f"time differs from the expected {expected_index[moved]}.",
                index,
                moved,
            )
    try:
        array = values.to_numpy(dtype="float64")
    except (TypeError, ValueError):
        _fail(source, column, f"values are not numeric (dtype {values.dtype}).", index, None)
    for mask, problem in (
        (np.isnan(array), "missing value (NaN)."),
        (np.isinf(array), "infinite value."),
        (np.zeros(len(array), bool) if allow_negative else array < 0, "negative value."),
    ):
        pos = _first(mask)
        if pos is not None:
            _fail(source, column, f"{problem} ({int(mask.sum())} such row(s))", index, pos)


def check_pv_plausibility(
    pv_energy_kwh: pd.Series,
    *,
    dc_kwp: float,
    ac_kw: float,
    step_hours: float = 1.0,
    source: str,
) -> list[str]:
    """Warn (PlausibilityWarning) about PV energy no real system of this size delivers.

    Flags an annualised specific yield above 2,000 kWh/kWp/yr and a mean power per step
    [kW] above the AC rating ``ac_kw``. Returns the messages (empty if plausible).
    """
    if ac_kw <= 0 or step_hours <= 0:
        raise ValueError(f"ac_kw and step_hours must be > 0, got {ac_kw}, {step_hours}")
    energy_kwh = pv_energy_kwh.to_numpy(dtype="float64")
    finite = np.isfinite(energy_kwh)
    messages: list[str] = []
    if not finite.any():
        return messages
    total_kwh = float(energy_kwh[finite].sum())
    years = len(energy_kwh) * step_hours / HOURS_PER_YEAR
    if dc_kwp > 0:
        yield_kwh_per_kwp_yr = total_kwh / years / dc_kwp
        if yield_kwh_per_kwp_yr > MAX_SPECIFIC_YIELD_KWH_PER_KWP_YR:
            messages.append(
                f"{source}: annualised specific yield {yield_kwh_per_kwp_yr:,.1f} kWh/kWp/yr "
                f"({total_kwh:,.0f} kWh over {years * 365:,.1f} days from {dc_kwp:,.0f} kWp) "
                f"exceeds {MAX_SPECIFIC_YIELD_KWH_PER_KWP_YR:,.0f}. Yield is at most the "
                "plane-of-array irradiation [kWh/m²/yr] times a performance ratio below 1; "
                "check the file's unit and scale and the DC capacity."
            )
    power_kw = np.where(finite, energy_kwh / step_hours, -np.inf)
    over = np.flatnonzero(power_kw > ac_kw * (1 + _AC_TOLERANCE_FRAC))
    if len(over):
        peak = int(np.argmax(power_kw))
        index = pv_energy_kwh.index
        messages.append(
            f"{source}: PV power exceeds the inverters' AC rating of {ac_kw:,.0f} kW in "
            f"{len(over)} of {len(power_kw)} steps, first at {index[over[0]]} "
            f"({power_kw[over[0]]:,.1f} kW); peak {power_kw[peak]:,.1f} kW at {index[peak]}. "
            "AC output cannot exceed the inverter rating: the file may hold DC power or "
            "belong to a larger system."
        )
    for message in messages:
        warnings.warn(message, PlausibilityWarning, stacklevel=2)
    return messages
