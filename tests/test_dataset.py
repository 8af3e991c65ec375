"""The site dataset: cache key and reuse, validation before writing, what the files hold."""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from omegaconf import OmegaConf

from pvbess import config
from pvbess.config import ConfigError, CsvSourceConfig, SiteConfig
from pvbess.errors import DataError
from pvbess.experiment import plots
from pvbess.site import dataset, ev_sessions
from pvbess.site.validation import PlausibilityWarning

from .conftest import compose_cfg


@pytest.fixture(scope="module")
def tiny_site() -> SiteConfig:
    return config.validate_site(compose_cfg(["site=tiny"]).site)


def _write_csv(path: Path, values: np.ndarray, start: str = "2024-01-01 00:00") -> Path:
    times = pd.date_range(start, periods=len(values), freq="h")
    pd.DataFrame({"datetime": times.strftime("%Y-%m-%d %H:%M:%S"), "value": values}).to_csv(
        path, index=False
    )
    return path


def _with_load_file(site: SiteConfig, path: Path) -> SiteConfig:
    csv = CsvSourceConfig(path=str(path), value_column="value")
    return replace(site, load=replace(site.load, source="csv", csv=csv))


def _listing(folder: Path) -> dict[str, int]:
    """Every file under ``folder`` with its modification time [ns]."""
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")}


# --- cache key and reuse --------------------------------------------------------------


def test_same_config_same_hash_and_cache_reused_without_rebuilding(
    tiny_site: SiteConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = dataset.build(tiny_site, tmp_path)
    before = _listing(first.root)
    assert dataset.data_hash(replace(tiny_site)) == first.data_hash

    def no_rebuild(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("rebuilt although the cache was valid")

    monkeypatch.setattr(dataset, "build_series", no_rebuild)
    again = dataset.build(tiny_site, tmp_path)
    assert again.root == first.root and again.data_hash == first.data_hash
    assert _listing(again.root) == before  # not a file rewritten
    assert again.summary == first.summary
    # Read back bit for bit: a cached run sees exactly the inputs of a fresh one.
    pd.testing.assert_frame_equal(again.series, first.series, check_exact=True)
    pd.testing.assert_frame_equal(again.sessions, first.sessions, check_exact=True)
    assert [p.name for p in tmp_path.iterdir()] == [first.root.name]  # no tmp left


def _leaves(tree: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for key, value in tree.items():
        path = (*prefix, key)
        out += _leaves(value, path) if isinstance(value, dict) else [path]
    return out


def _perturbed(value: Any) -> Any:
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    return f"{value}x" if isinstance(value, str) else "x"  # None -> a string


def test_any_changed_parameter_gives_a_new_hash(tiny_site: SiteConfig) -> None:
    base = asdict(tiny_site)
    leaves = _leaves(base)
    assert len(leaves) > 50  # every field of every section, EV classes included
    hashes = {dataset.data_hash(tiny_site)}
    for path in leaves:
        tree = asdict(tiny_site)
        node = tree
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = _perturbed(node[path[-1]])
        changed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SiteConfig), tree))
        assert isinstance(changed, SiteConfig)
        digest = dataset.data_hash(changed)
        assert digest not in hashes, ".".join(path)
        hashes.add(digest)


def test_changed_user_file_gives_a_new_hash_and_a_rebuild(
    tiny_site: SiteConfig, tmp_path: Path
) -> None:
    load_kwh = np.full(7 * 24, 40.0)
    path = _write_csv(tmp_path / "load.csv", load_kwh)
    site = _with_load_file(tiny_site, path)
    first = dataset.build(site, tmp_path / "data")
    assert first.series["load_kwh"].sum() == pytest.approx(40.0 * 168)

    load_kwh[100] = 90.0
    _write_csv(path, load_kwh)  # same path, new content
    assert dataset.data_hash(site) != first.data_hash
    second = dataset.build(site, tmp_path / "data")
    assert second.root != first.root
    assert second.series["load_kwh"].sum() == pytest.approx(40.0 * 167 + 90.0)

    # The content counts, not the location: a copy elsewhere shares the cache.
    copy = tmp_path / "elsewhere" / "copy.csv"
    copy.parent.mkdir()
    copy.write_bytes(path.read_bytes())
    assert dataset.data_hash(_with_load_file(tiny_site, copy)) == second.data_hash


def test_failed_build_leaves_nothing_to_reuse(
    tiny_site: SiteConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def crash(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("disk full")

    # The plot is written last but one, after every CSV and schema.json.
    monkeypatch.setattr(plots, "site_page", crash)
    with pytest.raises(RuntimeError, match="disk full"):
        dataset.build(tiny_site, tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither the dataset nor its tmp folder
    monkeypatch.undo()
    built = dataset.build(tiny_site, tmp_path)
    assert (built.root / "report" / "site.png").is_file()


@pytest.mark.parametrize(
    "damage",
    ["delete_manifest", "delete_charger_file", "truncate_building_csv", "foreign_manifest"],
)
def test_incomplete_cache_folder_is_rebuilt(
    tiny_site: SiteConfig, tmp_path: Path, damage: str
) -> None:
    built = dataset.build(tiny_site, tmp_path)
    root = built.root
    charger = root / "chargers" / "moto_000.csv"
    if damage == "delete_manifest":  # e.g. a folder written by a build that was killed
        (root / dataset.MANIFEST).unlink()
    elif damage == "delete_charger_file":
        charger.unlink()
    elif damage == "truncate_building_csv":
        text = (root / "building.csv").read_text()
        (root / "building.csv").write_text(text[: len(text) // 2])
    else:
        manifest = json.loads((root / dataset.MANIFEST).read_text())
        (root / dataset.MANIFEST).write_text(json.dumps(manifest | {"data_hash": "0" * 12}))
    again = dataset.build(tiny_site, tmp_path)
    assert again.root == root
    assert charger.is_file()
    assert len(pd.read_csv(root / "building.csv")) == len(built.index) + 1
    assert json.loads((root / dataset.MANIFEST).read_text())["data_hash"] == built.data_hash


# --- what the generated files hold ----------------------------------------------------


def test_files_have_one_row_more_than_steps(tiny_dataset: dataset.SiteDataset) -> None:
    n_steps = len(tiny_dataset.index)
    assert n_steps == 7 * 24
    root = tiny_dataset.root
    padded = ["building.csv", "weather.csv", "pricing.csv", "carbon_intensity.csv"]
    padded += [f"chargers/{sid}.csv" for sid, _ in tiny_dataset.sockets]
    assert len(padded) == 4 + 4
    for name in padded:
        assert len(pd.read_csv(root / name)) == n_steps + 1, name
    assert len(pd.read_csv(root / "series.csv")) == n_steps
    schema = json.loads((root / "schema.json").read_text())
    assert schema["simulation_end_time_step"] == n_steps
    # The padding row is away at every charger: no session spills into it.
    for sid, _ in tiny_dataset.sockets:
        last = pd.read_csv(root / "chargers" / f"{sid}.csv").iloc[-1]
        assert last["electric_vehicle_charger_state"] == 3


def test_summary_totals_equal_the_series_sums(tiny_dataset: dataset.SiteDataset) -> None:
    d, s = tiny_dataset, tiny_dataset.summary
    series, sessions, site = d.series, d.sessions, d.site
    assert s["pv_energy_kwh"] == pytest.approx(series["pv_kwh"].sum(), rel=1e-12)
    assert s["load_energy_kwh"] == pytest.approx(series["load_kwh"].sum(), rel=1e-12)
    assert s["pv_peak_kw"] == pytest.approx(series["pv_kwh"].max())  # 1-h steps: kW = kWh
    assert s["load_peak_kw"] == pytest.approx(series["load_kwh"].max())
    assert s["pv_energy_kwh"] > 0 and s["load_energy_kwh"] == pytest.approx(40.0 * 168)
    # What CityLearn reads carries the same energy (padding row excluded).
    building = pd.read_csv(d.root / "building.csv").iloc[:-1]
    assert building["non_shiftable_load"].sum() == pytest.approx(s["load_energy_kwh"], rel=1e-9)
    # solar_generation is W per kW installed.
    pv_kwh = building["solar_generation"].sum() * site.pv.dc_kwp / 1000.0
    assert pv_kwh == pytest.approx(s["pv_energy_kwh"], rel=1e-9)
    need_kwh = (sessions["required_soc_frac"] - sessions["arrival_soc_frac"]) * sessions[
        "battery_kwh"
    ]
    assert s["ev_required_energy_kwh"] == pytest.approx(need_kwh.sum(), rel=1e-12)
    assert s["ev_required_energy_kwh_per_day"] == pytest.approx(need_kwh.sum() / 7)
    assert s["ev_sessions"] == len(sessions) and s["ev_sessions_per_day"] == len(sessions) / 7
    for name in site.ev.classes:
        served = int((sessions["ev_class"] == name).sum())
        assert s["ev_served_arrivals"][name] == served
        assert s["ev_arrivals"][name] == served + s["ev_unserved_arrivals"][name]
    assert 0 < s["ev_plugged_peak"] <= s["ev_sockets"] == 4
    assert s["warnings"] == []


# --- validation: every error from a small bad input -----------------------------------


def _validate(d: dataset.SiteDataset, series: pd.DataFrame, sessions: pd.DataFrame) -> list[str]:
    ev = ev_sessions.EvSessions(sessions=sessions, sockets=d.sockets)
    return dataset.validate_inputs(d.site, d.index, series, ev)


def test_generated_tiny_inputs_pass(tiny_dataset: dataset.SiteDataset) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", PlausibilityWarning)
        assert _validate(tiny_dataset, tiny_dataset.series, tiny_dataset.sessions) == []


def test_steps_must_match_the_period(tiny_dataset: dataset.SiteDataset) -> None:
    short = tiny_dataset.series.iloc[:-1]
    with pytest.raises(DataError, match=r"column 'pv_kwh': 167 values, expected 168") as err:
        _validate(tiny_dataset, short, tiny_dataset.sessions)
    assert err.value.column == "pv_kwh"


def test_bad_series_value_names_row_and_time(tiny_dataset: dataset.SiteDataset) -> None:
    series = tiny_dataset.series.copy()
    series.iloc[30, series.columns.get_loc("load_kwh")] = np.nan
    with pytest.raises(DataError, match=r"'load_kwh', row 31 of 168 \(time 2024-01-02 06:00"):
        _validate(tiny_dataset, series, tiny_dataset.sessions)


def _sessions(*rows: tuple[str, str, int, int]) -> pd.DataFrame:
    """Sessions (socket, vehicle, arrival step, departure step) of class moto."""
    return pd.DataFrame(
        [
            {
                "session_id": f"s{i}",
                "socket_id": socket,
                "ev_class": socket.split("_")[0],
                "ev_id": ev_id,
                "arrival_step": a,
                "departure_step": d,
                "battery_kwh": 4.6,
                "arrival_soc_frac": 0.2,
                "required_soc_frac": 0.9,
            }
            for i, (socket, ev_id, a, d) in enumerate(rows)
        ]
    )


OK_ROW = ("moto_001", "moto_001_ev0", 9, 11)


@pytest.mark.parametrize(
    ("bad_row", "column", "needle"),
    [
        (("moto_000", "moto_000_ev1", 10, 12), "socket_id", "still occupied by row 1"),
        (("moto_001", "moto_001_ev1", 12, 12), "departure_step", "not after arrival"),
        (("moto_001", "moto_001_ev1", 160, 170), "departure_step", "after the period"),
        (("moto_001", "moto_001_ev1", -1, 2), "arrival_step", "before the period"),
        (("moto_002", "moto_000_ev0", 10, 11), "ev_id", "two places at once"),
        (("moto_009", "moto_009_ev0", 20, 21), "socket_id", "unknown socket"),
        (("moto_002", "moto_002_ev7", 20, 21), "ev_id", "not defined in the EV pool"),
    ],
)
def test_inconsistent_sessions_name_column_and_row(
    tiny_dataset: dataset.SiteDataset, bad_row: tuple, column: str, needle: str
) -> None:
    sessions = _sessions(("moto_000", "moto_000_ev0", 9, 11), OK_ROW, bad_row)
    with pytest.raises(DataError, match=needle) as err:
        _validate(tiny_dataset, tiny_dataset.series, sessions)
    assert (err.value.column, err.value.row) == (column, 3)
    assert f"column {column!r}, row 3 of 3 (session 's2'" in str(err.value)


def test_session_of_the_wrong_class_is_an_error(tiny_dataset: dataset.SiteDataset) -> None:
    sessions = _sessions(("mototaxi_000", "mototaxi_000_ev0", 9, 10))
    sessions.loc[0, "ev_class"] = "moto"
    with pytest.raises(DataError, match="serves class 'mototaxi'"):
        _validate(tiny_dataset, tiny_dataset.series, sessions)


def test_class_that_cannot_charge_in_time_warns_with_the_fraction(
    tiny_site: SiteConfig, tmp_path: Path
) -> None:
    # 1.5 kW x 0.95 = 1.4 kWh/h; a moto needs ~0.74 x 4.6 = 3.4 kWh in ~1.2 h.
    site = replace(tiny_site, ev=replace(tiny_site.ev, socket_power_kw=1.5))
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        built = dataset.build(site, tmp_path)
    messages = [str(w.message) for w in record if w.category is PlausibilityWarning]
    assert len(messages) == 2  # one per class
    moto = built.summary["ev_served_arrivals"]["moto"]
    unreachable = built.summary["ev_unreachable_sessions"]["moto"]
    assert moto / 2 < unreachable <= moto
    assert "'moto': the median session cannot reach" in messages[0]
    assert f"{unreachable / moto:.1%} of {moto} sessions fall short" in messages[0]
    assert built.summary["warnings"] == messages


def test_plausibility_warnings_repeat_on_cache_reuse(tiny_site: SiteConfig, tmp_path: Path) -> None:
    pv_kwh = np.full(7 * 24, 90.0)  # 90 kW around the clock from 100 kWp on 60 kW AC
    path = _write_csv(tmp_path / "pv.csv", pv_kwh)
    pv_cfg = replace(tiny_site.pv, source="csv", csv=CsvSourceConfig(path=str(path)))
    site = replace(tiny_site, pv=pv_cfg)
    for _ in range(2):  # built, then reused
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            dataset.build(site, tmp_path / "data")
        messages = [str(w.message) for w in record if w.category is PlausibilityWarning]
        assert len(messages) == 2
        assert "specific yield 7,884.0 kWh/kWp/yr" in messages[0]
        assert "AC rating of 60 kW in 168 of 168 steps" in messages[1]


def test_battery_limits_are_checked_by_build(tiny_site: SiteConfig, tmp_path: Path) -> None:
    # A SiteConfig made in code skips Hydra; build still runs config.py's checks.
    bad = replace(tiny_site, bess=replace(tiny_site.bess, soc_min_frac=0.9, soc_max_frac=0.5))
    with pytest.raises(ConfigError, match=r"site\.bess\.soc_min_frac"):
        dataset.build(bad, tmp_path)
    bad = replace(tiny_site, bess=replace(tiny_site.bess, power_kw=500.0))  # 5 C on 100 kWh
    with pytest.raises(ConfigError, match=r"site\.bess\.power_kw"):
        dataset.build(bad, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("field", "value", "needle"),
    [
        ("start", "2024-02-30 00:00", "site.start: cannot read"),
        ("start", "2024-01-01 00:30", "site.start: .* whole hour"),
        ("start", "2024-01-01 00:00-05:00", "site.start: .* UTC offset"),
        ("timezone", "America/Iquitos", "site.timezone: unknown"),
    ],
)
def test_period_contradictions_name_the_key(
    tiny_site: SiteConfig, tmp_path: Path, field: str, value: str, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        dataset.build(replace(tiny_site, **{field: value}), tmp_path)
    assert list(tmp_path.iterdir()) == []
