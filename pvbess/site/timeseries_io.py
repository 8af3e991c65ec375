"""Import a user's time series (CSV) onto the site's time index.

Conventions
-----------
* The site index is ``pd.date_range(start, periods=n, freq=step, tz=site_tz)`` and is
  left-labelled: the value at 10:00 is the energy [kWh] of 10:00-11:00.
* CSV timestamps are read the same way: each row's timestamp is the *start* of its
  interval, and the interval length is the file's resolution (the most common spacing).
  Meter exports that label a row by the *end* of its interval (``0:15`` for 0:00-0:15)
  set ``csv.timestamp_label=end``: every timestamp moves back by one resolution.
* Row numbers in error messages count data rows from 1 (the first row under the header)
  and also give the file line (header = line 1), which is the row number a spreadsheet
  shows when it opens the file.
* Timestamps are checked over the whole file (readable, unique, increasing); values,
  spacing and gaps only inside the site period, so a longer file may have holes elsewhere.
* In ';'-separated files a ',' inside a number is the decimal mark ("12,5") unless
  ``csv.decimal`` says otherwise; ``csv.thousands`` names a thousands separator
  ("1.489,5"). A value next to neighbours orders of magnitude larger or smaller (what
  "1,489" read as 1.489 gives) is warned about.

The reader is strict on purpose: every quirk it cannot resolve unambiguously (a gap, a
duplicate, a file for another year) raises :class:`DataError` instead of being patched.
"""

from __future__ import annotations

import difflib
import io
import math
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import numpy as np
import pandas as pd

from pvbess import errors
from pvbess.config import SEPARATORS, ConfigError, CsvSourceConfig
from pvbess.errors import DataError
from pvbess.site.validation import PlausibilityWarning

__all__ = ["DataError", "read_series"]

# Energy units give the energy of each row directly; power units give the mean power over
# the row's interval, so they are multiplied by the row duration [h].
_ENERGY_UNIT_TO_KWH = {"kwh": 1.0, "wh": 1e-3, "mwh": 1e3}
_POWER_UNIT_TO_KW = {"kw": 1.0, "w": 1e-3, "mw": 1e3}
_SEPARATOR_CANDIDATES = (";", ",", "\t")
# A UTC offset or 'Z' right after the time part: '...00:00-05:00', '...0000+0100', '...00Z'.
_OFFSET_RE = re.compile(r"(?:\d[+-]\d{2}:?\d{2}|\d[zZ])$")
_MISSING_WORDS = {"nan", "na", "n/a", "#n/a", "null", "none", "-"}
# Neighbouring rows whose values differ by this factor or more are warned about (a
# thousands separator read as a decimal mark gives 1,000).
_JUMP_FACTOR = 300.0


def _row_ref(row: int) -> str:
    """Describe 1-based data row ``row`` as a user finds it in the file."""
    return f"data row {row} (line {row + 1} of the file, header = line 1)"


@dataclass(frozen=True)
class _Ctx:
    """What every error message about one file needs."""

    path: Path
    time_column: str
    value_column: str
    time_text: pd.Series | None = None  # raw timestamps as written, to quote them

    def fail(
        self,
        problem: str,
        *,
        column: str,
        pos: int | None = None,
        time: str | None = None,
        hint: str = "",
    ) -> NoReturn:
        """Raise DataError for 0-based data position ``pos`` (None = whole file)."""
        where = ""
        if pos is not None:
            where = _row_ref(pos + 1)
            if self.time_text is not None:
                time = str(self.time_text.iloc[pos])
                where += f", timestamp {time!r}"
        errors.fail(
            str(self.path),
            column,
            problem,
            row=None if pos is None else pos + 1,
            where=where,
            time=time,
            hint=hint,
        )


def read_series(source: CsvSourceConfig, index: pd.DatetimeIndex, *, name: str) -> pd.Series:
    """Read one column of a user CSV as energy per site step [kWh], aligned to ``index``.

    ``index`` must be tz-aware and regular (its step sets the aggregation). Values are
    converted by ``source.unit`` (kWh/Wh/MWh per row, or kW/W/MW mean power per row),
    multiplied by ``source.scale`` and summed into the index's steps. Raises DataError
    for anything wrong with the file and ConfigError for an unusable ``source``.
    """
    step = _index_step(index)
    to_kwh, is_power = _unit_factor(source, name)
    site_tz = index.tz
    naive_tz = _naive_timezone(source, site_tz, name)
    path = _existing_path(source, name)

    source.check_source(f"{name}.csv")  # also for a source built in code, not validated
    frame, separator = _read_table(path, SEPARATORS[source.separator])
    ctx = _Ctx(path, source.time_column, source.value_column)
    _require_columns(frame, ctx, auto_separator=source.separator == "auto", separator=separator)
    ctx = _Ctx(path, source.time_column, source.value_column, frame[source.time_column])

    times = _parse_times(ctx, source, naive_tz=naive_tz, site_tz=site_tz)
    _check_order(ctx, times)
    file_step = _file_step(ctx, times, step)
    if source.timestamp_label == "end":
        times = times - file_step  # each row now labels the start of its interval

    end = index[-1] + step
    window = np.flatnonzero(np.asarray((times >= index[0]) & (times < end)))
    _check_grid(ctx, times, window, file_step, index[0])

    decimal = source.decimal if source.decimal != "auto" else ("," if separator == ";" else ".")
    thousands = None if source.thousands == "none" else source.thousands
    values = _parse_numbers(ctx, frame[source.value_column], window, decimal, thousands)
    _warn_jumps(ctx, values, window, frame[source.value_column])
    row_hours = file_step / pd.Timedelta(hours=1)
    energy_kwh = values * to_kwh * (row_hours if is_power else 1.0) * source.scale
    _check_energy(ctx, energy_kwh, window, frame[source.value_column])

    bins = np.asarray((times[window] - index[0]) // step, dtype=np.int64)
    rows_per_step = int(step // file_step)
    counts = np.bincount(bins, minlength=len(index))
    _check_coverage(ctx, counts, rows_per_step, times, file_step, index, step)
    total_kwh = np.bincount(bins, weights=energy_kwh, minlength=len(index))
    return pd.Series(total_kwh, index=index, name=name, dtype="float64")


# --- configuration and index ----------------------------------------------------------


def _index_step(index: pd.DatetimeIndex) -> pd.Timedelta:
    """Step of a tz-aware, regular index (a programming error if it is not)."""
    if not isinstance(index, pd.DatetimeIndex) or index.tz is None or len(index) == 0:
        raise ValueError("index must be a non-empty, tz-aware pd.DatetimeIndex")
    if len(index) == 1:
        if index.freq is None:
            raise ValueError("a one-step index needs a freq to define its step")
        return pd.Timedelta(index.freq)
    diffs = index[1:] - index[:-1]
    if (diffs != diffs[0]).any() or diffs[0] <= pd.Timedelta(0):
        raise ValueError("index must be increasing with a constant step")
    return pd.Timedelta(diffs[0])


def _unit_factor(source: CsvSourceConfig, name: str) -> tuple[float, bool]:
    """Return (factor to kWh or kW, True if the unit is a power)."""
    unit = source.unit.strip().lower()
    if not math.isfinite(source.scale):
        raise ConfigError(f"{name}.csv.scale: must be a finite number, got {source.scale}")
    if unit in _ENERGY_UNIT_TO_KWH:
        return _ENERGY_UNIT_TO_KWH[unit], False
    if unit in _POWER_UNIT_TO_KW:
        return _POWER_UNIT_TO_KW[unit], True
    raise ConfigError(
        f"{name}.csv.unit: unknown unit {source.unit!r}; use kWh, Wh or MWh for energy per "
        "row, or kW, W or MW for mean power over each row's interval"
    )


def _naive_timezone(source: CsvSourceConfig, site_tz: object, name: str) -> object:
    """Time zone for timestamps written without an offset."""
    if source.timezone is None:
        return site_tz
    try:
        pd.Timestamp("2000-01-01").tz_localize(source.timezone)
    except (KeyError, ValueError) as exc:  # ZoneInfoNotFoundError is a KeyError
        raise ConfigError(
            f"{name}.csv.timezone: unknown time zone {source.timezone!r} "
            "(use an IANA name such as 'America/Lima' or 'UTC')"
        ) from exc
    return source.timezone


def _existing_path(source: CsvSourceConfig, name: str) -> Path:
    if not source.path:
        raise ConfigError(f"{name}.csv.path: no file given")
    path = Path(source.path).expanduser()
    if not path.is_file():
        raise DataError(
            f"{path}: file not found (reading {name!r}; resolved to {path.resolve()}). "
            "Check the csv.path setting.",
            path=str(path),
        )
    return path


# --- reading the table ----------------------------------------------------------------


def _decode(path: Path) -> str:
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")  # also strips a UTF-8 byte-order mark
    except UnicodeDecodeError:
        # Excel on Windows saves 'CSV' in the ANSI code page; accented headers survive.
        return raw.decode("cp1252", errors="replace")


def _sniff_separator(text: str) -> str:
    """Pick the separator most frequent in the header line (',' if none)."""
    header = next((line for line in text.splitlines() if line.strip()), "")
    counts = {sep: header.count(sep) for sep in _SEPARATOR_CANDIDATES}
    best = max(counts, key=lambda sep: counts[sep])
    return best if counts[best] > 0 else ","


def _read_table(path: Path, separator: str) -> tuple[pd.DataFrame, str]:
    """Read every field as text; drop trailing empty rows (Excel leaves ';;;' lines)."""
    text = _decode(path)
    sep = _sniff_separator(text) if separator == "auto" else separator
    try:
        # Blank lines are kept so that data row N is always file line N + 1.
        frame = pd.read_csv(
            io.StringIO(text), sep=sep, dtype=str, keep_default_na=False, skip_blank_lines=False
        )
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DataError(
            f"{path}: cannot be read as CSV with separator {sep!r}: {exc}", path=str(path)
        ) from exc
    frame.columns = [str(c).strip() for c in frame.columns]
    frame = frame.fillna("")
    filled = frame.apply(lambda col: col.str.strip() != "").any(axis=1).to_numpy()
    rows = np.flatnonzero(filled)
    if len(rows) == 0:
        raise DataError(f"{path}: has a header but no data rows.", path=str(path))
    return frame.iloc[: rows[-1] + 1], sep


def _require_columns(
    frame: pd.DataFrame, ctx: _Ctx, *, auto_separator: bool, separator: str
) -> None:
    found = list(frame.columns)
    for column in (ctx.time_column, ctx.value_column):
        if column in found:
            continue
        if len(found) == 1 and auto_separator:
            hint = (
                f" Only one column was found with separator {separator!r}: "
                "set csv.separator explicitly."
            )
        else:
            close = difflib.get_close_matches(column, found, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
        ctx.fail(f"column not found; the columns found are {found}.{hint}", column=column)


# --- timestamps -----------------------------------------------------------------------


def _fmt_duration(delta: pd.Timedelta) -> str:
    minutes = delta / pd.Timedelta(minutes=1)
    if minutes >= 60 and minutes % 60 == 0:
        return f"{minutes / 60:g} h"
    return f"{minutes:g} min"


def _format_hint(source: CsvSourceConfig) -> str:
    if source.date_format:
        return f"It does not match csv.date_format {source.date_format!r}."
    return (
        f"Set csv.date_format (e.g. '%d/%m/%Y %H:%M') or csv.dayfirst "
        f"(now {source.dayfirst}) to match the file's dates."
    )


def _to_datetime(text: pd.Series, source: CsvSourceConfig, *, utc: bool) -> pd.Series:
    with warnings.catch_warnings():
        # Without a format pandas infers one from the first row and warns when it cannot;
        # rows that do not parse become NaT and are reported below, so the warning is noise.
        warnings.simplefilter("ignore", UserWarning)
        if source.date_format:
            return pd.to_datetime(text, format=source.date_format, errors="coerce", utc=utc)
        return pd.to_datetime(text, dayfirst=source.dayfirst, errors="coerce", utc=utc)


def _parse_times(
    ctx: _Ctx, source: CsvSourceConfig, *, naive_tz: object, site_tz: object
) -> pd.DatetimeIndex:
    """Parse the time column and express it in the site time zone."""
    assert ctx.time_text is not None
    column = ctx.time_column
    text = ctx.time_text.str.strip()
    empty = np.flatnonzero((text == "").to_numpy())
    if len(empty):
        ctx.fail("the timestamp is empty.", column=column, pos=int(empty[0]))
    has_offset = text.str.contains(_OFFSET_RE.pattern, regex=True).to_numpy(dtype=bool)
    mixed = np.flatnonzero(has_offset != has_offset[0])
    if len(mixed):
        ctx.fail(
            f"this timestamp {'lacks' if has_offset[0] else 'has'} a UTC offset but the "
            f"one in data row 1 ({text.iloc[0]!r}) {'has' if has_offset[0] else 'lacks'} one.",
            column=column,
            pos=int(mixed[0]),
            hint="Write every timestamp the same way.",
        )
    parsed = _to_datetime(text, source, utc=bool(has_offset[0]))
    bad = np.flatnonzero(parsed.isna().to_numpy())
    if len(bad):
        ctx.fail(
            f"cannot read the timestamp ({len(bad)} unreadable row(s) in the file).",
            column=column,
            pos=int(bad[0]),
            hint=_format_hint(source),
        )
    times = pd.DatetimeIndex(parsed)
    if has_offset[0]:
        return times.tz_convert(site_tz)
    try:
        local = times.tz_localize(naive_tz, ambiguous="infer", nonexistent="raise")
    except ValueError as exc:  # a wall-clock time skipped or repeated by daylight saving
        ctx.fail(
            f"timestamps without an offset do not fit time zone {naive_tz}: {exc}",
            column=column,
            hint="Write timestamps with a UTC offset or set csv.timezone.",
        )
    return local.tz_convert(site_tz)


def _check_order(ctx: _Ctx, times: pd.DatetimeIndex) -> None:
    """No repeated timestamps, strictly increasing (checked over the whole file)."""
    column = ctx.time_column
    repeated = np.flatnonzero(times.duplicated())
    if len(repeated):
        pos = int(repeated[0])
        first = int(np.flatnonzero(times == times[pos])[0])
        ctx.fail(
            f"duplicate timestamp: the same time as {_row_ref(first + 1)} "
            f"({len(repeated)} repeated row(s) in the file).",
            column=column,
            pos=pos,
            hint="Remove or merge the repeated rows.",
        )
    backwards = np.flatnonzero(np.asarray(times[1:] < times[:-1]))
    if len(backwards):
        pos = int(backwards[0]) + 1
        ctx.fail(
            f"timestamps are not in increasing order: this row is earlier than the one "
            f"before it ({times[pos - 1]}).",
            column=column,
            pos=pos,
            hint="Sort the file by time.",
        )


def _file_step(ctx: _Ctx, times: pd.DatetimeIndex, step: pd.Timedelta) -> pd.Timedelta:
    """The file's resolution: its most common spacing, which must divide ``step``."""
    if len(times) < 2:
        return step
    diffs = np.asarray(times[1:] - times[:-1])
    values, counts = np.unique(diffs, return_counts=True)
    file_step = pd.Timedelta(values[np.argmax(counts)])
    if step % file_step != pd.Timedelta(0):
        ctx.fail(
            f"the file's resolution is {_fmt_duration(file_step)} (its most common spacing, "
            f"first seen after this row), which does not divide the site step of "
            f"{_fmt_duration(step)}, so rows cannot be summed into whole steps.",
            column=ctx.time_column,
            pos=int(np.flatnonzero(diffs == values[np.argmax(counts)])[0]),
            hint=f"Resample the file to {_fmt_duration(step)} or to a divisor of it.",
        )
    return file_step


def _check_grid(
    ctx: _Ctx,
    times: pd.DatetimeIndex,
    window: np.ndarray,
    file_step: pd.Timedelta,
    start: pd.Timestamp,
) -> None:
    """Rows inside the site period lie on the file's grid, without gaps."""
    if len(window) == 0:
        return
    assert ctx.time_text is not None
    column = ctx.time_column
    first = int(window[0])
    if (times[first] - start) % file_step != pd.Timedelta(0):
        ctx.fail(
            f"the timestamp is not on the {_fmt_duration(file_step)} grid of the site period "
            f"that starts at {start}.",
            column=column,
            pos=first,
            hint="Each row must start at a whole multiple of the file's resolution.",
        )
    diffs = times[window[1:]] - times[window[:-1]]
    bad = np.flatnonzero(np.asarray(diffs != file_step))
    if len(bad) == 0:
        return
    pos = int(window[bad[0]])
    gap = pd.Timedelta(diffs[bad[0]])
    after = f"the next row ({ctx.time_text.iloc[pos + 1]!r}) is {_fmt_duration(gap)} later"
    if gap % file_step == pd.Timedelta(0):
        problem = (
            f"gap in the data: {after}, so {int(gap // file_step) - 1} row(s) of "
            f"{_fmt_duration(file_step)} are missing after this one."
        )
    else:
        problem = (
            f"irregular spacing: {after}; the file's resolution is {_fmt_duration(file_step)}."
        )
    ctx.fail(
        problem,
        column=column,
        pos=pos,
        hint="Fill the missing rows in the file; pvbess does not invent data.",
    )


# --- values ---------------------------------------------------------------------------


def _parse_numbers(
    ctx: _Ctx, raw: pd.Series, window: np.ndarray, decimal: str, thousands: str | None
) -> np.ndarray:
    """Read the value column's rows in ``window`` as finite floats."""
    text = raw.iloc[window].str.strip()
    if thousands is not None:
        text = text.str.replace(thousands, "", regex=False)
    if decimal == ",":
        # Locales that separate fields with ';' write decimals with ',' ("12,5").
        text = text.str.replace(",", ".", regex=False)
    values = pd.to_numeric(text.to_numpy(dtype=object), errors="coerce").astype("float64")
    bad = np.flatnonzero(~np.isfinite(values))
    if len(bad) == 0:
        return values
    pos = int(window[bad[0]])
    original = str(raw.iloc[pos]).strip()
    count = f"{len(bad)} such row(s) in the site period"
    fill_hint = "Fill it in the file (e.g. by interpolation); pvbess does not guess missing data."
    if original == "":
        problem, hint = f"the value is empty ({count}).", fill_hint
    elif original.lower() in _MISSING_WORDS:
        problem, hint = f"missing value {original!r} (NaN; {count}).", fill_hint
    elif np.isinf(values[bad[0]]):
        problem, hint = f"infinite value {original!r} ({count}).", "Values must be finite."
    else:
        problem = f"cannot read {original!r} as a number ({count})."
        hint = (
            f"Write plain numbers without units; the decimal mark is {decimal!r} and the "
            f"thousands separator {thousands or 'none'} (csv.decimal, csv.thousands)."
        )
    ctx.fail(problem, column=ctx.value_column, pos=pos, hint=hint)


def _warn_jumps(ctx: _Ctx, values: np.ndarray, window: np.ndarray, raw: pd.Series) -> None:
    """Warn about a value orders of magnitude below (or above) both its neighbours:
    '1,489' read as 1.489 between 1,500s. A ramp (PV at dawn: 0, 0.001, 2, 40) is not
    one: a row is compared only when both neighbours and itself are positive."""
    if len(values) < 3:
        return
    prev, mid, nxt = values[:-2], values[1:-1], values[2:]
    positive = (prev > 0) & (mid > 0) & (nxt > 0)
    safe = np.where(positive, mid, 1.0)
    low = np.where(positive, np.minimum(prev, nxt) / safe, 1.0)  # mid far below both
    high = np.where(positive, safe / np.where(positive, np.maximum(prev, nxt), 1.0), 1.0)
    ratio = np.maximum(low, high)
    jumps = np.flatnonzero(ratio >= _JUMP_FACTOR)
    if len(jumps) == 0:
        return
    i = int(jumps[0])
    pos = int(window[i + 1])
    side = "smaller" if low[i] >= high[i] else "larger"
    warnings.warn(
        f"{ctx.path}: column {ctx.value_column!r}, {_row_ref(pos + 1)}: the value "
        f"{str(raw.iloc[pos]).strip()!r} is {ratio[i]:.0f}x {side} than both its neighbours "
        f"({len(jumps)} such row(s) in the site period). If it holds a thousands separator, "
        "set csv.thousands (and csv.decimal); if the data are right, ignore this warning.",
        PlausibilityWarning,
        stacklevel=3,
    )


def _check_energy(ctx: _Ctx, energy_kwh: np.ndarray, window: np.ndarray, raw: pd.Series) -> None:
    negative = np.flatnonzero(energy_kwh < 0)
    if len(negative) == 0:
        return
    pos = int(window[negative[0]])
    ctx.fail(
        f"negative energy {energy_kwh[negative[0]]:.6g} kWh (value {raw.iloc[pos].strip()!r}; "
        f"{len(negative)} negative row(s) in the site period).",
        column=ctx.value_column,
        pos=pos,
        hint="Energy flows must be >= 0; if the file writes this flow as negative numbers, "
        "set csv.scale to -1.",
    )


def _check_coverage(
    ctx: _Ctx,
    counts: np.ndarray,
    rows_per_step: int,
    times: pd.DatetimeIndex,
    file_step: pd.Timedelta,
    index: pd.DatetimeIndex,
    step: pd.Timedelta,
) -> None:
    """Every site step must receive all of its rows."""
    short = np.flatnonzero(counts < rows_per_step)
    if len(short) == 0:
        return
    first = int(short[0])
    file_end, site_end = times[-1] + file_step, index[-1] + step
    problem = (
        f"the file does not cover the whole site period: {len(short)} of {len(index)} "
        f"{_fmt_duration(step)} steps have no or incomplete data, the first missing step "
        f"starts at {index[first]}. The file covers {times[0]} to {file_end}; the site "
        f"period is {index[0]} to {site_end} (times in {index.tz}, each row read as the "
        "start of its interval)."
    )
    file_years = set(range(times[0].year, file_end.year + 1))
    site_years = set(range(index[0].year, site_end.year + 1))
    if counts.sum() == 0 and not file_years & site_years:
        same_pattern = (times[0].month, times[0].day, times[0].hour) == (
            index[0].month,
            index[0].day,
            index[0].hour,
        )
        pattern = " with the same calendar start" if same_pattern else ""
        hint = (
            f"The file holds {times[0].year} data{pattern}, "
            f"the site period is in {index[0].year}; pvbess does not shift data between "
            f"years: set site.start within the file's period or re-date the file."
        )
    elif 0 < counts[first] < rows_per_step:
        hint = (
            f"That step has {counts[first]} of {rows_per_step} rows: if the file labels each "
            "row by the end of its interval (a meter export from 0:15 to 0:00), set "
            "csv.timestamp_label=end."
        )
    else:
        hint = "Supply data for the whole period or shorten it (site.start, site.days)."
    ctx.fail(problem, column=ctx.value_column, time=str(index[first]), hint=hint)
