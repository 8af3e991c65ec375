"""Shared fixtures: composed configs with tmp paths, a tiny site dataset, an MLflow store."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, open_dict

from pvbess import config, dataset

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SHARED_OE2 = ROOT.parent / "shared" / "oe2"

os.environ.setdefault("CITYLEARN_OFFLINE", "1")
config.register()


def compose_cfg(overrides: list[str] | None = None, tmp: Path | None = None) -> DictConfig:
    """Compose conf/train.yaml as the entrypoint would, with paths under ``tmp``."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides or [])
    # Outside @hydra.main there is no hydra runtime to resolve the default paths.
    tmp = tmp if tmp is not None else Path("/nonexistent/pvbess-unused")
    with open_dict(cfg):
        cfg.paths.root_dir = str(tmp)
        cfg.paths.data_dir = str(tmp / "data")
        cfg.paths.output_dir = str(tmp / "out")
    return cfg


@pytest.fixture(scope="session")
def session_tmp(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("pvbess")


@pytest.fixture(scope="session")
def tiny_cfg(session_tmp: Path) -> DictConfig:
    return compose_cfg(["site=tiny"], session_tmp)


@pytest.fixture(scope="session")
def tiny_dataset(tiny_cfg: DictConfig) -> dataset.SiteDataset:
    return dataset.build(config.validate_site(tiny_cfg.site), tiny_cfg.paths.data_dir)


@pytest.fixture()
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    def _make(*overrides: str) -> DictConfig:
        return compose_cfg(list(overrides), tmp_path)

    return _make
