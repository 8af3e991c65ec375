"""Entry point: ``python -m pvbess.compare site=iquitos_mall [reward=...] [verify=true]
[verify_jobs=N]``; ``promote=<run id>`` registers that run's controller as ``<site>`` and
points the alias ``champion`` at it (``pvbess.deploy.promote``) instead of comparing.

Composes ``conf/compare.yaml`` and calls ``pvbess.experiment.compare``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from pvbess import config
from pvbess.experiment import tracking
from pvbess.experiment.compare import Selection, compare, print_table

config.register()


@hydra.main(version_base="1.3", config_path="../conf", config_name="compare")
def main(cfg: DictConfig) -> None:
    # site and reward are the config groups of training: their presets' names select.
    site = cfg.site.name
    reward = cfg.reward.name if cfg.get("reward") else None
    experiment = cfg.tracking.experiment or site
    tracking.configure(cfg.tracking.uri, cfg.paths.root_dir, experiment)
    if cfg.get("promote"):
        from mlflow.exceptions import MlflowException

        from pvbess import deploy

        try:
            version = deploy.promote(str(cfg.promote), site)
        except (deploy.PromoteError, MlflowException) as exc:
            print(f"error: {type(exc).__name__}: {exc}", file=sys.stderr)
            raise SystemExit(1) from None
        print(
            f"promoted run {cfg.promote}: {version.name} version {version.version} is "
            f"models:/{version.name}@{deploy.CHAMPION}"
        )
        return
    tags = OmegaConf.to_container(cfg.tags) if cfg.tags else None
    run_ids = list(cfg.run_ids) if cfg.run_ids else None
    sel = Selection(
        site=site,
        experiment=experiment,
        reward=reward,
        parent_run_id=cfg.parent_run_id,
        tags=tags,
        run_ids=run_ids,
    )  # type: ignore[arg-type]
    shown, notes = compare(
        sel,
        Path(cfg.report_dir),
        verify_data_dir=cfg.paths.data_dir if cfg.verify else None,
        verify_jobs=cfg.verify_jobs,
    )
    print_table(shown, notes)
    print(f"report: {cfg.report_dir}")


if __name__ == "__main__":
    main()
