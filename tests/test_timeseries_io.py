"""Importing user CSV files onto the site index: the user's real files, quirks, errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pvbess.config import ConfigError, CsvSourceConfig
from pvbess.errors import DataError
from pvbess.site.timeseries_io import read_series

OE2_DIR = Path(__file__).resolve().parents[2] / "shared" / "oe2"
PV_FILE = OE2_DIR / "pv_generation_hourly_citylearn_v2.csv"
MALL_FILE = OE2_DIR / "demandamallhorakwh.csv"
TZ = "America/Lima"


def _index(start: str = "2024-01-01 00:00", periods: int = 8760) -> pd.DatetimeIndex:
    return pd.date_range(start, periods=periods, freq="h", tz=TZ)


def _user_file(path: Path) -> Path:
    if not path.is_file():
        pytest.skip(f"user data not available: {path}")
    return path


def _write(tmp_path: Path, text: str, *, encoding: str = "utf-8") -> Path:
    path = tmp_path / "data.csv"
    path.write_text(text, encoding=encoding)
    return path


def _hourly_csv(values: list[str], start: str = "2024-01-01 00:00", freq: str = "h") -> str:
    times = pd.date_range(start, periods=len(values), freq=freq)
    rows = [f"{t:%Y-%m-%d %H:%M:%S},{v}" for t, v in zip(times, values, strict=True)]
    return "datetime,value\n" + "\n".join(rows) + "\n"


def _read(path: Path, index: pd.DatetimeIndex, **settings: object) -> pd.Series:
    settings.setdefault("value_column", "value")
    return read_series(CsvSourceConfig(path=str(path), **settings), index, name="x")


# --- the user's files -----------------------------------------------------------------


def test_user_pv_file_imports_onto_2024_index() -> None:
    path = _user_file(PV_FILE)
    index = _index()
    pv_kwh = read_series(CsvSourceConfig(path=str(path), value_column="pv_kwh"), index, name="pv")
    raw = pd.read_csv(path)
    assert pv_kwh.name == "pv"
    assert pv_kwh.index.equals(index)
    assert pv_kwh.sum() == pytest.approx(raw["pv_kwh"].sum(), rel=1e-12)
    assert pv_kwh.sum() == pytest.approx(8_292_514.17, abs=0.01)
    # Row by row: the -05:00 offsets land on the same Lima wall-clock hours.
    np.testing.assert_array_equal(pv_kwh.to_numpy(), raw["pv_kwh"].to_numpy())
    assert pv_kwh.idxmax() == pd.Timestamp("2024-01-01 10:00", tz=TZ)


def test_user_mall_file_imports_naive_timestamps() -> None:
    path = _user_file(MALL_FILE)
    settings = CsvSourceConfig(path=str(path), value_column="mall_demand_kwh")
    mall_kwh = read_series(settings, _index(), name="mall")
    raw = pd.read_csv(path)
    assert len(mall_kwh) == 8760
    assert mall_kwh.sum() == raw["mall_demand_kwh"].sum() == 12_368_653
    assert mall_kwh.max() == 2763
    assert mall_kwh.idxmax() == pd.Timestamp("2024-09-14 16:00", tz=TZ)
    assert (mall_kwh == 0).sum() == 28  # zero hours are data, not missing values


def test_user_pv_file_for_another_year_is_not_shifted() -> None:
    settings = CsvSourceConfig(path=str(_user_file(PV_FILE)), value_column="pv_kwh")
    with pytest.raises(DataError) as err:
        read_series(settings, _index("2025-01-01 00:00"), name="pv")
    message = str(err.value)
    assert "'pv_kwh'" in message
    assert "8760 of 8760" in message
    assert "2024-01-01 00:00:00-05:00 to 2024-12-31 00:00:00-05:00" in message
    assert "does not shift data between years" in message


# --- formats that must import ---------------------------------------------------------


def test_quarter_hour_semicolon_bom_dayfirst_kw_file_averages_power(tmp_path: Path) -> None:
    # Day 13 makes day-first unambiguous; '0:15' has a one-digit hour; '1000,5' a decimal
    # comma; the trailing ';' line is what Excel leaves behind.
    text = (
        "fecha;potencia_kw\n"
        "13/01/2024 0:00;100\n"
        "13/01/2024 0:15;200\n"
        "13/01/2024 0:30;300\n"
        "13/01/2024 0:45;400\n"
        "13/01/2024 1:00;1000,5\n"
        "13/01/2024 1:15;0\n"
        "13/01/2024 1:30;0\n"
        "13/01/2024 1:45;0\n"
        ";\n"
    )
    path = _write(tmp_path, text, encoding="utf-8-sig")
    assert path.read_bytes().startswith(b"\xef\xbb\xbf")
    index = _index("2024-01-13 00:00", periods=2)
    energy_kwh = _read(
        path, index, time_column="fecha", value_column="potencia_kw", unit="kW", dayfirst=True
    )
    # kW x 0.25 h per row, summed per hour.
    assert energy_kwh.tolist() == pytest.approx([(100 + 200 + 300 + 400) * 0.25, 1000.5 * 0.25])
    assert energy_kwh.index.equals(index)


def test_day_first_file_without_dayfirst_names_the_row(tmp_path: Path) -> None:
    text = "fecha;kw\n12/01/2024 23:00;1\n13/01/2024 0:00;1\n"
    path = _write(tmp_path, text)
    with pytest.raises(DataError) as err:
        _read(path, _index("2024-12-01 23:00", periods=1), time_column="fecha", value_column="kw")
    assert "'fecha'" in str(err.value)
    assert "data row 2 (line 3 of the file" in str(err.value)
    assert "'13/01/2024 0:00'" in str(err.value)
    assert "dayfirst" in str(err.value)


def test_quarter_hour_kwh_file_sums(tmp_path: Path) -> None:
    values_kwh = np.arange(12, dtype=float) * 1.5  # three hours of 15-minute energy
    path = _write(tmp_path, _hourly_csv([f"{v}" for v in values_kwh], freq="15min"))
    energy_kwh = _read(path, _index(periods=3))
    assert energy_kwh.tolist() == pytest.approx(values_kwh.reshape(3, 4).sum(axis=1).tolist())
    assert energy_kwh.sum() == pytest.approx(values_kwh.sum())


@pytest.mark.parametrize(
    ("unit", "kwh_per_value"),
    [("kWh", 1.0), ("Wh", 1e-3), ("MWh", 1e3), ("kW", 1.0), ("W", 1e-3), ("MW", 1e3)],
)
def test_units_and_scale_on_hourly_rows(tmp_path: Path, unit: str, kwh_per_value: float) -> None:
    path = _write(tmp_path, _hourly_csv(["1", "2.5", "4"]))
    energy_kwh = _read(path, _index(periods=3), unit=unit, scale=2.0)
    assert energy_kwh.tolist() == pytest.approx([2 * kwh_per_value * v for v in (1, 2.5, 4)])


def test_utc_offsets_match_site_wall_clock(tmp_path: Path) -> None:
    # 05:00 UTC is 00:00 in Lima: the row at 05:00+00:00 is the first site hour.
    text = "datetime,value\n" + "".join(
        f"2024-01-01 {h:02d}:00:00+00:00,{h}\n" for h in range(4, 9)
    )
    energy_kwh = _read(_write(tmp_path, text), _index(periods=3))
    assert energy_kwh.tolist() == [5.0, 6.0, 7.0]


def test_naive_timestamps_use_the_configured_time_zone(tmp_path: Path) -> None:
    path = _write(tmp_path, _hourly_csv([str(h) for h in range(10)]))
    assert _read(path, _index(periods=2)).tolist() == [0.0, 1.0]
    assert _read(path, _index(periods=2), timezone="UTC").tolist() == [5.0, 6.0]


def test_explicit_separator_and_date_format(tmp_path: Path) -> None:
    text = "t|v\n01.02.2024 00h|3\n01.02.2024 01h|4\n"
    path = _write(tmp_path, text)
    energy_kwh = _read(
        path,
        _index("2024-02-01 00:00", periods=2),
        time_column="t",
        value_column="v",
        separator="|",
        date_format="%d.%m.%Y %Hh",
    )
    assert energy_kwh.tolist() == [3.0, 4.0]


def test_only_the_site_period_is_used(tmp_path: Path) -> None:
    # A missing value outside the site period does not block the import.
    path = _write(tmp_path, _hourly_csv(["", "1", "2", "3", ""]))
    assert _read(path, _index("2024-01-01 01:00", periods=3)).tolist() == [1.0, 2.0, 3.0]


# --- errors ---------------------------------------------------------------------------


def _error(path: Path, index: pd.DatetimeIndex | None = None, **settings: object) -> DataError:
    with pytest.raises(DataError) as err:
        _read(path, _index(periods=4) if index is None else index, **settings)
    return err.value


def test_missing_file(tmp_path: Path) -> None:
    err = _error(tmp_path / "nope.csv")
    assert "nope.csv" in str(err) and "not found" in str(err)


def test_missing_column_lists_the_columns_found(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, _hourly_csv(["1"] * 4)), value_column="pv_kwh")
    assert "column 'pv_kwh'" in str(err)
    assert "['datetime', 'value']" in str(err)


def test_wrong_separator_is_suggested(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, "datetime|value\n2024-01-01 00:00|1\n"))
    assert "set csv.separator" in str(err)


@pytest.mark.parametrize(
    ("bad_time", "problem"),
    [("2024-01-01 xx:00", "cannot read the timestamp"), ("", "timestamp is empty")],
)
def test_unreadable_timestamp(tmp_path: Path, bad_time: str, problem: str) -> None:
    text = _hourly_csv(["1"] * 4).replace("2024-01-01 02:00:00", bad_time)
    path = _write(tmp_path, text)
    err = _error(path)
    assert problem in str(err)
    assert "column 'datetime'" in str(err)
    assert "data row 3 (line 4 of the file" in str(err)
    assert err.row == 3
    # The line number points at the offending line.
    assert path.read_text().splitlines()[4 - 1] == f"{bad_time},1"


@pytest.mark.parametrize(
    ("bad_value", "problem"),
    [
        ("12,5x", "cannot read '12,5x' as a number"),
        ("", "the value is empty"),
        ("NaN", "missing value 'NaN'"),
        ("inf", "infinite value 'inf'"),
    ],
)
def test_unreadable_values(tmp_path: Path, bad_value: str, problem: str) -> None:
    text = "datetime;kwh\n" + "".join(
        f"2024-01-01 0{h}:00;{bad_value if h == 1 else '12,5'}\n" for h in range(4)
    )
    err = _error(_write(tmp_path, text), value_column="kwh")
    assert problem in str(err)
    assert "column 'kwh'" in str(err)
    assert "data row 2" in str(err) and "'2024-01-01 01:00'" in str(err)


def test_negative_energy_suggests_scale(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, _hourly_csv(["1", "2", "-5", "1"])))
    assert "negative energy -5 kWh" in str(err)
    assert "data row 3" in str(err) and "'2024-01-01 02:00:00'" in str(err)
    assert "csv.scale to -1" in str(err)
    # The suggested fix works for a file that is negative throughout.
    flipped = _write(tmp_path, _hourly_csv(["-1", "-2", "-5", "-1"]))
    assert _read(flipped, _index(periods=4), scale=-1).tolist() == [1.0, 2.0, 5.0, 1.0]


def test_duplicate_timestamp(tmp_path: Path) -> None:
    text = _hourly_csv(["1"] * 5).replace("02:00:00", "01:00:00")
    err = _error(_write(tmp_path, text))
    assert "duplicate timestamp" in str(err)
    assert "column 'datetime', data row 3" in str(err)
    assert "same time as data row 2" in str(err)
    assert "'2024-01-01 01:00:00'" in str(err)


def test_unordered_timestamps(tmp_path: Path) -> None:
    lines = _hourly_csv(["1", "2", "3", "4"]).splitlines()
    lines[2], lines[3] = lines[3], lines[2]
    err = _error(_write(tmp_path, "\n".join(lines) + "\n"))
    assert "not in increasing order" in str(err)
    assert "data row 3" in str(err) and "'2024-01-01 01:00:00'" in str(err)


def test_gap_in_the_data(tmp_path: Path) -> None:
    lines = _hourly_csv(["1"] * 6).splitlines()
    del lines[3]  # 02:00
    err = _error(_write(tmp_path, "\n".join(lines) + "\n"), _index(periods=5))
    assert "gap in the data" in str(err)
    assert "data row 2" in str(err) and "'2024-01-01 01:00:00'" in str(err)
    assert "1 row(s) of 1 h are missing" in str(err)


def test_resolution_that_does_not_divide_the_step(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, _hourly_csv(["1"] * 9, freq="40min")))
    assert "40 min" in str(err) and "does not divide the site step of 1 h" in str(err)
    assert "column 'datetime'" in str(err) and "data row 1" in str(err)


def test_timestamps_off_the_grid(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, _hourly_csv(["1"] * 6, start="2024-01-01 00:30")))
    assert "not on the 1 h grid" in str(err)
    assert "data row 1" in str(err) and "'2024-01-01 00:30:00'" in str(err)


def test_file_too_short(tmp_path: Path) -> None:
    err = _error(_write(tmp_path, _hourly_csv(["1"] * 3)), _index(periods=5))
    assert "column 'value'" in str(err)
    assert "2 of 5 1 h steps" in str(err)
    assert "first missing step starts at 2024-01-01 03:00:00-05:00" in str(err)
    assert err.time == "2024-01-01 03:00:00-05:00"


def test_end_labelled_quarter_hours_are_flagged(tmp_path: Path) -> None:
    path = _write(tmp_path, _hourly_csv(["1"] * 8, start="2024-01-01 00:15", freq="15min"))
    err = _error(path, _index(periods=2))
    assert "3 of 4 rows" in str(err) and "csv.timestamp_label=end" in str(err)


def test_end_labelled_quarter_hour_file_imports_with_timestamp_label_end(
    tmp_path: Path,
) -> None:
    # A meter export: 1/01/2024 0:15 .. 2/01/2024 0:00 (96 rows), each row the energy of
    # the quarter hour that ENDS at its timestamp. Row k holds k kWh (k = 1..96), so the
    # hour h (rows 4h+1 .. 4h+4) sums to 16h + 10.
    times = pd.date_range("2024-01-01 00:15", periods=96, freq="15min")
    rows = [
        f"{t.day}/{t.month:02d}/{t.year} {t.hour}:{t.minute:02d};{k}"
        for k, t in zip(range(1, 97), times, strict=True)
    ]
    path = _write(tmp_path, "fecha;kwh\n" + "\n".join(rows) + "\n")
    index = _index(periods=24)
    energy_kwh = _read(
        path,
        index,
        time_column="fecha",
        value_column="kwh",
        dayfirst=True,
        timestamp_label="end",
    )
    assert energy_kwh.tolist() == [16.0 * h + 10.0 for h in range(24)]
    # Read as start-labelled, the first hour has 3 of its 4 rows: the error points at the
    # setting.
    err = _error(path, index, time_column="fecha", value_column="kwh", dayfirst=True)
    assert "3 of 4 rows" in str(err) and "csv.timestamp_label=end" in str(err)


def test_thousands_separator_is_warned_about_then_read_when_set(tmp_path: Path) -> None:
    # '1,489' among 1,500s written without a separator, in a ';' file: under the
    # decimal-comma rule it reads 1.489 (warned about, naming the row); with
    # csv.thousands=',' and csv.decimal='.', it reads 1489. (A file that writes every
    # value with a thousands separator gives no jump to see: csv.thousands is the way.)
    index = _index(periods=4)
    mixed = "datetime;value\n" + "".join(
        f"2024-01-01 0{h}:00;{v}\n" for h, v in enumerate(["1500", "1510", "1,489", "1520"])
    )
    path = _write(tmp_path, mixed)
    with pytest.warns(UserWarning, match=r"data row 3 .*'1,489' is 1014x smaller than both"):
        assert _read(path, index).tolist() == [1500, 1510, 1.489, 1520]
    assert _read(path, index, thousands=",", decimal=".").tolist() == [1500, 1510, 1489, 1520]
    # '1.489,5' with a '.' thousands separator and a ',' decimal mark.
    path = _write(tmp_path, "datetime;value\n2024-01-01 00:00;1.489,5\n")
    assert _read(path, _index(periods=1), thousands=".").tolist() == [1489.5]


def test_pv_ramps_from_zero_are_not_warned_about(tmp_path: Path) -> None:
    import warnings

    values = ["0", "0.001", "2", "40", "60", "40", "2", "0.002", "0"]
    path = _write(tmp_path, _hourly_csv(values))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _read(path, _index(periods=len(values))).sum() == pytest.approx(144.003)


@pytest.mark.parametrize("separator", ["xx", ".*", ":"])
def test_only_documented_separators(tmp_path: Path, separator: str) -> None:
    path = _write(tmp_path, _hourly_csv(["1"] * 2))
    with pytest.raises(ConfigError, match=r"x.csv.separator: unknown separator"):
        _read(path, _index(periods=2), separator=separator)


def test_tab_separator_by_name(tmp_path: Path) -> None:
    path = _write(tmp_path, "datetime\tvalue\n2024-01-01 00:00\t7\n")
    assert _read(path, _index(periods=1), separator="tab").tolist() == [7.0]


def test_mixed_offsets(tmp_path: Path) -> None:
    text = "datetime,value\n2024-01-01 00:00:00-05:00,1\n2024-01-01 01:00:00,1\n"
    err = _error(_write(tmp_path, text), _index(periods=2))
    assert "lacks a UTC offset" in str(err) and "data row 2" in str(err)


def test_bad_settings_are_config_errors(tmp_path: Path) -> None:
    path = _write(tmp_path, _hourly_csv(["1"] * 2))
    with pytest.raises(ConfigError, match="unit"):
        _read(path, _index(periods=2), unit="kVA")
    with pytest.raises(ConfigError, match="timezone"):
        _read(path, _index(periods=2), timezone="Mars/Olympus")
    with pytest.raises(ConfigError, match="path"):
        read_series(CsvSourceConfig(path=None), _index(periods=2), name="x")
