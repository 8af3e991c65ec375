"""The site CLI, the user-file preset, and CityLearn envs built from every site preset."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from omegaconf import open_dict

from pvbess import config
from pvbess.site import dataset
from pvbess.site.validation import PlausibilityWarning

from .conftest import ROOT, SHARED_OE2, compose_cfg, run_module

PV_FILE = SHARED_OE2 / "pv_generation_hourly_citylearn_v2.csv"
MALL_FILE = SHARED_OE2 / "demandamallhorakwh.csv"


# --- the CLI --------------------------------------------------------------------------


def test_cli_builds_tiny_and_prints_the_summary(tmp_path: Path) -> None:
    proc = run_module("pvbess.site", ["site=tiny"], tmp_path, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    site = config.validate_site(compose_cfg(["site=tiny"]).site)
    digest = dataset.data_hash(site)
    folder = tmp_path / "data" / "sites" / f"tiny-{digest}"
    for needle in (
        "site tiny: 7 days, 168 hourly steps",
        "PV specific yield",
        "kWh/kWp/yr",  # units survive rich's markup
        "EV energy required",
        "EV moto: unserved (no free socket)",
        digest,
        f"dataset: {folder}\n",
        f"plot:    {folder / 'report' / 'site.png'}\n",
    ):
        assert needle in out, needle
    assert (folder / "report" / "site.png").is_file()
    # The printed figures are the summary's: 40 kW mean load over 168 h = 6.7 MWh.
    assert "6.7" in out.split("load energy", 1)[1].splitlines()[0]


def test_cli_exits_nonzero_naming_the_bad_row(tmp_path: Path) -> None:
    times = pd.date_range("2024-01-01", periods=7 * 24, freq="h").strftime("%Y-%m-%d %H:%M")
    values = ["40"] * len(times)
    values[4] = "n/a"
    bad = tmp_path / "load.csv"
    bad.write_text(
        "datetime,value\n" + "".join(f"{t},{v}\n" for t, v in zip(times, values, strict=True))
    )
    args = ["site=tiny", "site.load.source=csv", f"site.load.csv.path={bad}"]
    proc = run_module("pvbess.site", args, tmp_path, timeout=120)
    assert proc.returncode == 1
    assert f"error: DataError: {bad}, column 'value', data row 5" in proc.stderr
    assert "missing value 'n/a'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not list(tmp_path.rglob("schema.json"))  # failed before writing a dataset


# --- the user-file preset -------------------------------------------------------------


def test_user_file_preset_imports_the_files_and_warns(tmp_path: Path) -> None:
    for path in (PV_FILE, MALL_FILE):
        if not path.is_file():
            pytest.skip(f"user data not available: {path}")
    cfg = compose_cfg(["site=iquitos_mall_user_files"], tmp_path)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)  # the preset's files are ../shared/oe2 from here
    site = config.validate(cfg).site
    assert Path(site.pv.csv.path).resolve() == PV_FILE.resolve()
    assert Path(site.load.csv.path).resolve() == MALL_FILE.resolve()
    with pytest.warns(PlausibilityWarning) as record:
        data = dataset.build(site, tmp_path / "data")
    messages = [str(w.message) for w in record]
    assert any("specific yield 2,047.5 kWh/kWp/yr" in m for m in messages)
    assert any("AC rating of 1,670 kW" in m for m in messages)

    pv_raw = pd.read_csv(PV_FILE)["pv_kwh"]
    mall_raw = pd.read_csv(MALL_FILE)["mall_demand_kwh"]
    assert len(data.series) == len(pv_raw) == len(mall_raw) == 8760
    assert data.series["pv_kwh"].sum() == pytest.approx(pv_raw.sum(), rel=1e-12)
    assert data.series["load_kwh"].sum() == pytest.approx(mall_raw.sum(), rel=1e-12)
    # Row for row: PV timestamps carry -05:00, mall timestamps are Lima wall clock.
    np.testing.assert_array_equal(data.series["pv_kwh"].to_numpy(), pv_raw.to_numpy())
    np.testing.assert_array_equal(data.series["load_kwh"].to_numpy(), mall_raw.to_numpy())
    s = data.summary
    assert (s["pv_source"], s["load_source"]) == ("csv", "csv")
    assert s["pv_energy_kwh"] == pytest.approx(pv_raw.sum())
    assert s["load_energy_kwh"] == pytest.approx(12_368_653.0, abs=1.0)  # the notes' figure
    assert len(s["warnings"]) == 2


# --- CityLearn from each preset -------------------------------------------------------


def _citylearn_sizes(data: dataset.SiteDataset) -> tuple[int, int]:
    """Chargers and action size of a CityLearn env loaded straight from the schema."""
    from citylearn.citylearn import CityLearnEnv  # slow import, only here

    env = CityLearnEnv(str(data.schema_path), central_agent=True)
    chargers = env.buildings[0].electric_vehicle_chargers or []
    return len(chargers), int(env.action_space[0].shape[0])


def test_citylearn_tiny_has_4_chargers_and_5_actions(tiny_dataset: dataset.SiteDataset) -> None:
    assert _citylearn_sizes(tiny_dataset) == (4, 5)


@pytest.mark.parametrize(
    ("site", "sizes"),
    [
        ("iquitos_mall", (38, 39)),
        pytest.param("iquitos_mall_128", (128, 129), marks=pytest.mark.slow),
    ],
)
def test_citylearn_preset_sizes(site: str, sizes: tuple[int, int], tmp_path: Path) -> None:
    cfg = compose_cfg([f"site={site}"], tmp_path)
    data = dataset.build(config.validate(cfg).site, cfg.paths.data_dir)
    assert data.n_sockets == sizes[0]
    assert _citylearn_sizes(data) == sizes
