"""The policy a learner is evaluated with: its best on a validation year.

With ``env.validation_seed`` set, SB3's ``EvalCallback`` scores the learner's
deterministic policy on one episode of that year (the twin, the same levers and
scaling; neither a training year nor the evaluation year) at step 0 and every
``select_every`` training steps, and keeps the best. The run is then evaluated
with that policy instead of whatever the last update left: policy-gradient steps
on a signal as weak as this site's (control moves the year's objective by ~1.6 %)
drift as often as they improve, and a learner that starts at a controller (the
residual learner on the MPC) should not end below where it began because of it.
The score is the validation year's summed reward, i.e. minus its objective.
"""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# In the run directory: EvalCallback's best_model.zip and evaluations.npz, and beside
# them the VecNormalize statistics the best policy saw and its score.
BEST_DIR = "best"
MODEL_FILE = "best_model.zip"
VECNORMALIZE_FILE = "best_vecnormalize.pkl"
SCORE_FILE = "best.json"
EVALUATIONS_FILE = "evaluations.npz"


def callback(validation_env: Any, model: Any, every_steps: int, save_dir: Path) -> Any:
    """An EvalCallback on ``validation_env`` (a ``SiteEnv``) every ``every_steps`` training
    steps and at step 0, saving the best policy in ``save_dir``; on a resumed run it
    starts from the best score already saved there."""
    from stable_baselines3.common.callbacks import BaseCallback, EvalCallback
    from stable_baselines3.common.monitor import Monitor
    from stable_baselines3.common.vec_env import DummyVecEnv, VecNormalize

    venv: Any = DummyVecEnv([lambda: Monitor(validation_env)])
    if model.get_vec_normalize_env() is not None:
        # EvalCallback copies the training statistics in before each score; frozen here,
        # and the reward it sums is the env's own.
        venv = VecNormalize(venv, training=False, norm_reward=False)

    class SaveScore(BaseCallback):
        """On a new best: the VecNormalize statistics and the score beside its zip."""

        def _on_step(self) -> bool:
            vec_normalize = self.model.get_vec_normalize_env()
            if vec_normalize is not None:
                vec_normalize.save(str(save_dir / VECNORMALIZE_FILE))
            score = {"steps": self.num_timesteps, "reward": self.parent.best_mean_reward}
            (save_dir / SCORE_FILE).write_text(json.dumps(score))
            log.info("best on the validation year so far: %d steps", self.num_timesteps)
            return True

    class BestOnValidation(EvalCallback):
        def _init_callback(self) -> None:
            # The twin's VecEnv and the validation's DummyVecEnv differ in class only;
            # their wrappers (VecNormalize or none) match, which is what syncing needs.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Training and eval env are not")
                super()._init_callback()

        def _on_training_start(self) -> None:
            if self.model.num_timesteps == 0:
                self._on_step()  # n_calls is 0: the untrained policy is a candidate too

    best = BestOnValidation(
        venv,
        callback_on_new_best=SaveScore(),
        n_eval_episodes=1,
        eval_freq=max(every_steps // model.n_envs, 1),
        log_path=str(save_dir),
        best_model_save_path=str(save_dir),
        deterministic=True,
        verbose=0,
    )
    saved = read_score(save_dir)
    if saved is not None:
        best.best_mean_reward = saved["reward"]
    return best


def read_score(save_dir: Path) -> dict[str, float] | None:
    """The saved best's ``{'steps', 'reward'}``, or None when no policy was scored."""
    path = save_dir / SCORE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def restore_best(model: Any, save_dir: Path) -> dict[str, float] | None:
    """Put the best policy's weights, and the VecNormalize statistics it was scored with,
    into ``model``; returns its score, or None (nothing scored: the model is unchanged)."""
    from stable_baselines3.common.save_util import load_from_zip_file

    from pvbess.experiment.checkpoints import CheckpointError, restore_vec_normalize

    score = read_score(save_dir)
    if score is None:
        return None
    zip_path = save_dir / MODEL_FILE
    data, _, _ = load_from_zip_file(zip_path, device=model.device, load_data=True)
    if data is None or int(data["num_timesteps"]) != int(score["steps"]):
        # A kill between the zip and its score: they would be two different policies.
        raise CheckpointError(
            f"{zip_path} is not the policy scored in {save_dir / SCORE_FILE} "
            f"({score['steps']} steps); delete {save_dir} to choose the last policy"
        )
    model.set_parameters(str(zip_path), exact_match=True, device=model.device)
    vn_path = save_dir / VECNORMALIZE_FILE
    restore_vec_normalize(model, vn_path if vn_path.is_file() else None, zip_path)
    return score
