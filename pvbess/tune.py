"""Entry point: ``python -m pvbess.tune hparams_search=ppo_optuna [site=...] [tune.n_trials=...]``.

The search itself is ``pvbess.experiment.tune``.
"""

from __future__ import annotations

import sys

from pvbess.experiment.tune import main

if __name__ == "__main__":
    sys.exit(main())
