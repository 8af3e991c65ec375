"""Entry point: ``python -m pvbess.site site=iquitos_mall``.

Builds (or reuses) the site's CityLearn dataset and prints what a user checks
first: energy, peaks, EV service, the data hash and where the files are. Bad
configuration or data exit with status 1 and one message naming the key, file,
column or row.
"""

from __future__ import annotations

import warnings
from typing import Any

import hydra
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table
from rich.text import Text

from pvbess import config
from pvbess.config import ConfigError
from pvbess.errors import DataError
from pvbess.site import dataset
from pvbess.site.validation import PlausibilityWarning

config.register()

EXIT_BAD_INPUT = 1


def summary_table(summary: dict[str, Any]) -> Table:
    """The summary's figures in display units (MWh, kWh/day, kW)."""
    s = summary
    table = Table(title=f"site {s['site']}: {s['days']:g} days, {s['steps']} hourly steps")
    table.add_column("quantity")
    table.add_column("value", justify="right")
    table.add_column("unit")
    rows = [
        ("PV energy", f"{s['pv_energy_kwh'] / 1e3:,.1f}", f"MWh ({s['pv_source']})"),
        ("PV specific yield", f"{s['pv_specific_yield_kwh_per_kwp_yr']:,.0f}", "kWh/kWp/yr"),
        ("PV peak", f"{s['pv_peak_kw']:,.0f}", "kW"),
        ("load energy", f"{s['load_energy_kwh'] / 1e3:,.1f}", f"MWh ({s['load_source']})"),
        ("load peak", f"{s['load_peak_kw']:,.0f}", "kW"),
        ("EV energy required", f"{s['ev_required_energy_kwh_per_day']:,.1f}", "kWh/day"),
        ("EV sessions", f"{s['ev_sessions_per_day']:,.1f}", "per day"),
        ("EV sockets", f"{s['ev_sockets']}", ""),
        ("EV socket power, all sockets", f"{s['ev_socket_power_kw_total']:,.1f}", "kW"),
        ("EV sockets busy at once, max", f"{s['ev_plugged_peak']}", ""),
    ]
    for name, arrivals in s["ev_arrivals"].items():
        unserved = s["ev_unserved_arrivals"][name]
        share = unserved / arrivals if arrivals else 0.0
        rows += [
            (f"EV {name}: arrivals", f"{arrivals:,}", ""),
            (f"EV {name}: unserved (no free socket)", f"{unserved:,} ({share:.1%})", ""),
        ]
        if s["ev_unreachable_sessions"][name]:
            rows.append(
                (f"EV {name}: too short to charge", f"{s['ev_unreachable_sessions'][name]:,}", "")
            )
    rows += [
        ("BESS capacity", f"{s['bess_capacity_kwh']:,.0f}", "kWh"),
        ("BESS power", f"{s['bess_power_kw']:,.0f}", "kW"),
        ("data hash", s["data_hash"], ""),
    ]
    for row in rows:
        # Text, not markup: nothing in a cell is read as a rich style.
        table.add_row(*(Text(cell) for cell in row))
    return table


def print_report(data: dataset.SiteDataset, console: Console) -> None:
    """The summary table, its warnings, and the dataset's folder and plot."""
    console.print(summary_table(data.summary))
    for message in data.summary.get("warnings", []):
        # Text, not markup: messages hold brackets such as "[kWh]".
        console.print(Text(f"warning: {message}", style="yellow"), soft_wrap=True)
    # Plain prints: a path must stay on one line to be copied.
    print(f"dataset: {data.root}")
    print(f"plot:    {data.root / 'report' / 'site.png'}")


def run(cfg: DictConfig, console: Console | None = None) -> dataset.SiteDataset:
    """Validate the config, build the dataset, print its report."""
    typed = config.validate(cfg)
    with warnings.catch_warnings():
        # The report prints them with the summary, once and readably.
        warnings.simplefilter("ignore", PlausibilityWarning)
        data = dataset.build(typed.site, typed.paths.data_dir)
    print_report(data, console or Console())
    return data


@hydra.main(version_base="1.3", config_path="../../conf", config_name="site_cli")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg)
    except (ConfigError, DataError) as exc:
        message = Text(f"error: {type(exc).__name__}: {exc}", style="red")
        Console(stderr=True).print(message, soft_wrap=True)
        # SystemExit passes through Hydra's error handler: no traceback for bad input.
        raise SystemExit(EXIT_BAD_INPUT) from None


if __name__ == "__main__":
    main()
