"""EV sessions: sockets and vehicles never double-booked, counts, statistics, charger files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from pvbess.config import EvClassConfig, EvConfig
from pvbess.site import ev_sessions

TZ = "America/Lima"
DAYS = 365
# The Iquitos fleet (270 motos of 60 min, 39 mototaxis of 90 min a day), open 09:00-22:00.
MOTO = {"vehicles_per_day": 270.0, "battery_kwh": 4.6, "session_minutes_mean": 60.0}
MOTOTAXI = {"vehicles_per_day": 39.0, "battery_kwh": 7.4, "session_minutes_mean": 90.0}


def _index(days: int = DAYS) -> pd.DatetimeIndex:
    return pd.date_range("2024-01-01", periods=days * 24, freq="h", tz=TZ)


def _ev(moto_sockets: int, mototaxi_sockets: int, **ev: float) -> EvConfig:
    common = {"arrival_soc_frac_mean": 0.2, "arrival_soc_frac_std": 0.08, "required_soc_frac": 0.94}
    return EvConfig(
        classes={
            "moto": EvClassConfig(sockets=moto_sockets, **MOTO, **common),
            "mototaxi": EvClassConfig(sockets=mototaxi_sockets, **MOTOTAXI, **common),
        },
        **ev,
    )


@pytest.fixture(scope="module")
def site_year() -> ev_sessions.EvSessions:
    """The Iquitos sockets (30 + 8): busy enough to turn vehicles away."""
    return ev_sessions.generate_sessions(_index(), _ev(30, 8), seed=0)


@pytest.fixture(scope="module")
def ample_year() -> ev_sessions.EvSessions:
    """The same fleet with far more sockets than it ever needs at once."""
    return ev_sessions.generate_sessions(_index(), _ev(120, 40), seed=1)


def _overlaps(sessions: pd.DataFrame, key: str) -> int:
    """Sessions that start before the previous session with the same ``key`` has left."""
    s = sessions.sort_values([key, "arrival_step"])
    previous_departure = s.groupby(key)["departure_step"].shift()
    return int((s["arrival_step"] < previous_departure).sum())


# --- sockets and vehicles -------------------------------------------------------------


@pytest.mark.parametrize("year", ["site_year", "ample_year"])
def test_sessions_never_overlap_on_a_socket(year: str, request: pytest.FixtureRequest) -> None:
    s = request.getfixturevalue(year).sessions
    assert len(s) > 50_000
    assert _overlaps(s, "socket_id") == 0
    assert (s["departure_step"] > s["arrival_step"]).all()


def test_a_vehicle_is_never_at_two_sockets_at_once(site_year: ev_sessions.EvSessions) -> None:
    s = site_year.sessions
    assert _overlaps(s, "ev_id") == 0
    # Stronger, by construction: each vehicle id belongs to one socket only.
    assert s.groupby("ev_id")["socket_id"].nunique().max() == 1
    # Back-to-back sessions at a socket are different vehicles (a new connection).
    s = s.sort_values(["socket_id", "arrival_step"])
    same_socket = s["socket_id"].eq(s["socket_id"].shift())
    back_to_back = same_socket & s["arrival_step"].eq(s["departure_step"].shift())
    assert back_to_back.sum() > 0
    assert not (back_to_back & s["ev_id"].eq(s["ev_id"].shift())).any()


def test_generated_sessions_pass_the_dataset_checks(site_year: ev_sessions.EvSessions) -> None:
    pool = {v for sid, _ in site_year.sockets for v in ev_sessions.vehicle_ids(sid)}
    ev_sessions.check_sessions(
        site_year.sessions, site_year.sockets, DAYS * 24, source="gen", vehicles=pool
    )


def test_sessions_lie_within_opening_hours(site_year: ev_sessions.EvSessions) -> None:
    s = site_year.sessions
    hour = s["arrival_step"] % 24  # the index starts at midnight
    assert hour.between(9, 21).all()
    # Departure at the latest at closing time (22:00) of the arrival day.
    assert (s["departure_step"] <= s["arrival_step"] - hour + 22).all()


# --- counts ---------------------------------------------------------------------------


@pytest.mark.parametrize("year", ["site_year", "ample_year"])
def test_arrivals_are_served_plus_unserved(year: str, request: pytest.FixtureRequest) -> None:
    ev = request.getfixturevalue(year)
    served = ev.sessions["ev_class"].value_counts()
    for name in ("moto", "mototaxi"):
        assert ev.arrivals[name] == served[name] + ev.unserved[name]


def test_unserved_only_when_sockets_are_scarce(
    site_year: ev_sessions.EvSessions, ample_year: ev_sessions.EvSessions
) -> None:
    assert site_year.unserved["moto"] > 0 and site_year.unserved["mototaxi"] > 0
    assert ample_year.unserved == {"moto": 0, "mototaxi": 0}
    # A class without sockets turns every vehicle away.
    none = ev_sessions.generate_sessions(_index(7), _ev(2, 0), seed=0)
    assert none.arrivals["mototaxi"] > 0
    assert none.unserved["mototaxi"] == none.arrivals["mototaxi"]


def test_same_seed_same_sessions_other_seed_differs() -> None:
    index, ev = _index(14), _ev(3, 1)
    a = ev_sessions.generate_sessions(index, ev, seed=7)
    b = ev_sessions.generate_sessions(index, ev, seed=7)
    c = ev_sessions.generate_sessions(index, ev, seed=8)
    pd.testing.assert_frame_equal(a.sessions, b.sessions)
    assert (a.arrivals, a.unserved) == (b.arrivals, b.unserved)
    assert not a.sessions.equals(c.sessions)


def test_daily_arrivals_are_poisson_with_the_configured_mean(
    ample_year: ev_sessions.EvSessions,
) -> None:
    # With ample sockets every arrival is a session, so sessions count arrivals per day.
    s = ample_year.sessions
    for name, per_day in (("moto", 270.0), ("mototaxi", 39.0)):
        daily = np.bincount(s.loc[s["ev_class"] == name, "arrival_step"] // 24, minlength=DAYS)
        # The yearly total is Poisson(365 x per_day): within 4 standard deviations
        # (two-sided p = 6e-5 for a correct generator; a 2 % bias in the rate fails).
        assert abs(daily.sum() - DAYS * per_day) < 4 * np.sqrt(DAYS * per_day)
        assert ample_year.arrivals[name] == daily.sum()
        # Poisson: variance = mean. The ratio's standard error is about sqrt(2 / 364)
        # = 0.074 over a year; 5 of them allow 0.63..1.37 (a constant count gives 0).
        assert daily.var(ddof=1) / daily.mean() == pytest.approx(1.0, abs=5 * np.sqrt(2 / 364))


def _expected_dwell_steps(mean_minutes: float) -> float:
    """E[max(1, round(G / 60 min))] for G ~ Gamma(shape 4, mean ``mean_minutes``) [steps]."""
    gamma = stats.gamma(4.0, scale=mean_minutes / 4.0)
    edges_min = (np.arange(1, 60) + 0.5) * 60.0  # step k covers [(k-0.5) h, (k+0.5) h)
    cdf = gamma.cdf(edges_min)
    p = np.diff(np.concatenate([[0.0], cdf]))  # p[0] = P(1 step) includes rounding to 0
    return float(np.sum(np.arange(1, 60) * p))


@pytest.mark.parametrize(("name", "mean_minutes"), [("moto", 60.0), ("mototaxi", 90.0)])
def test_dwell_mean_matches_the_configured_gamma(
    ample_year: ev_sessions.EvSessions, name: str, mean_minutes: float
) -> None:
    s = ample_year.sessions
    # Arrivals up to 13:00 leave 9 h before closing: the closing cut never binds
    # (P(dwell > 8.5 h) < 1e-6 for both classes), so dwell is the rounded Gamma draw.
    mine = s[(s["ev_class"] == name) & (s["arrival_step"] % 24 <= 13)]
    dwell = (mine["departure_step"] - mine["arrival_step"]).to_numpy(dtype=float)
    expected = _expected_dwell_steps(mean_minutes)
    # Whole hourly steps, at least one: the mean shifts up from the configured minutes
    # (60 min -> 1.16 steps, 90 min -> 1.55 steps), but stays within half a step.
    assert abs(expected - mean_minutes / 60.0) < 0.5
    standard_error = dwell.std(ddof=1) / np.sqrt(len(dwell))
    assert abs(dwell.mean() - expected) < 5 * standard_error


# --- energy reachability --------------------------------------------------------------


def test_shortfall_by_hand() -> None:
    sessions = pd.DataFrame(
        {
            "ev_class": ["moto", "moto"],
            "arrival_step": [10, 10],
            "departure_step": [11, 13],
            "battery_kwh": [4.6, 4.6],
            "arrival_soc_frac": [0.2, 0.2],
            "required_soc_frac": [0.9, 0.9],
        }
    )
    # Need 0.7 x 4.6 = 3.22 kWh. At 2 kW x 0.95: 1.9 kWh in 1 h, 5.7 kWh in 3 h.
    ev = _ev(1, 1, socket_power_kw=2.0, charger_efficiency_frac=0.95)
    np.testing.assert_allclose(ev_sessions.shortfall_kwh(sessions, ev), [3.22 - 1.9, 0.0])
    assert ev_sessions.unreachable_sessions(sessions, ev) == {"moto": 1, "mototaxi": 0}
    # At 7.4 kW a socket delivers 7.03 kWh in one hour: everything is reachable.
    assert ev_sessions.shortfall_kwh(sessions, _ev(1, 1)).sum() == 0.0


# --- CityLearn charger files ----------------------------------------------------------


def _session(sid: str, socket: str, ev_id: str, arrival: int, departure: int, soc: float) -> dict:
    return {
        "session_id": sid,
        "socket_id": socket,
        "ev_class": "moto",
        "ev_id": ev_id,
        "arrival_step": arrival,
        "departure_step": departure,
        "battery_kwh": 4.6,
        "arrival_soc_frac": soc,
        "required_soc_frac": 0.9,
    }


def test_charger_table_by_hand() -> None:
    sessions = pd.DataFrame(
        [
            _session("a", "moto_000", "moto_000_ev0", 1, 3, 0.25),
            _session("b", "moto_000", "moto_000_ev1", 5, 6, 0.40),
            _session("x", "moto_001", "moto_001_ev0", 0, 8, 0.10),  # another socket
        ]
    )
    t = ev_sessions.charger_table(sessions, "moto_000", 8)
    assert len(t) == 8
    # Steps:        0   1   2   3   4   5   6   7
    # a plugged 1-2, b plugged 5; each announced (state 2) the step before it arrives.
    assert t["electric_vehicle_charger_state"].tolist() == [2, 1, 1, 3, 2, 1, 3, 3]
    assert t["electric_vehicle_id"].tolist() == [
        "moto_000_ev0",
        "moto_000_ev0",
        "moto_000_ev0",
        "",
        "moto_000_ev1",
        "moto_000_ev1",
        "",
        "",
    ]
    nan = np.nan
    # Steps left until departure, 1 on the last plugged step.
    np.testing.assert_array_equal(
        t["electric_vehicle_departure_time"], [nan, 2, 1, nan, nan, 1, nan, nan]
    )
    np.testing.assert_array_equal(
        t["electric_vehicle_required_soc_departure"], [nan, 0.9, 0.9, nan, nan, 0.9, nan, nan]
    )
    # The incoming row carries the arrival SOC and "arrives in 1 step".
    np.testing.assert_array_equal(
        t["electric_vehicle_estimated_soc_arrival"], [0.25, 0.25, 0.25, nan, 0.4, 0.4, nan, nan]
    )
    np.testing.assert_array_equal(
        t["electric_vehicle_estimated_arrival_time"], [1, nan, nan, nan, 1, nan, nan, nan]
    )
    assert t["electric_vehicle_session_id"].tolist() == ["", "a", "a", "", "", "b", "", ""]


def test_charger_table_back_to_back_sessions_have_no_incoming_row() -> None:
    sessions = pd.DataFrame(
        [
            _session("a", "moto_000", "moto_000_ev0", 0, 2, 0.25),
            _session("b", "moto_000", "moto_000_ev1", 2, 4, 0.40),
        ]
    )
    t = ev_sessions.charger_table(sessions, "moto_000", 5)
    assert t["electric_vehicle_charger_state"].tolist() == [1, 1, 1, 1, 3]
    np.testing.assert_array_equal(t["electric_vehicle_departure_time"], [2, 1, 2, 1, np.nan])
    # CityLearn reads b's arrival SOC on its first plugged row (the session id changes).
    assert t["electric_vehicle_estimated_soc_arrival"].tolist()[2] == 0.40
    assert t["electric_vehicle_session_id"].tolist() == ["a", "a", "b", "b", ""]
