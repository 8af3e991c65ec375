"""Speed figures, printed (never asserted): ``make bench`` / ``python -m pvbess.experiment.bench``.

- raw CityLearn steps/s under random actions vs. the pvbess env under the same
  actions (the wrapper's cost: target ratio >= 0.95);
- the pvbess env on the numpy twin (``env.backend=twin``) under the same actions,
  and the twin's VecEnv stepping ``--n-envs`` copies at once (env steps/s summed
  over the copies);
- PPO training steps/s end to end: through the pvbess env on CityLearn, on the
  twin, and on the twin's VecEnv;
- peak memory of the process;
- the wall time the default learner (``python -m pvbess.train``'s agent and env
  levers) takes to reach ``--share-target`` % of the optimum's gain on the held-out
  year, or its best share within ``--share-budget`` steps (``--share-budget 0``: skip).

``--study`` times the README's commands instead (``pvbess.experiment.study``).
"""

import argparse
import resource
import sys
import tempfile
import time

from pvbess.experiment import speed
from pvbess.experiment.study import STUDY_TARGETS, _key, _study_parts, study
from pvbess.sim.twin import TwinData
from pvbess.site import dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m pvbess.experiment.bench",
        description=__doc__.splitlines()[0],
        usage="%(prog)s [options]\n       %(prog)s --study [PARTS] [--site S] [--budget N] "
        "[OVERRIDE ...]",
    )
    parser.add_argument("--site", default="iquitos_mall")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="env steps per measurement (default 2000; with --study: of the reference, 1000)",
    )
    parser.add_argument("--ppo-steps", type=int, default=4096)
    parser.add_argument(
        "--repeats", type=int, default=3, help="repeats of each measurement (best one counts)"
    )
    parser.add_argument("--n-envs", type=int, default=16, help="copies in the twin's VecEnv")
    parser.add_argument("--twin-ppo-steps", type=int, default=32768)
    parser.add_argument("--share-target", type=float, default=90.0, metavar="PCT")
    parser.add_argument(
        "--share-budget",
        type=int,
        default=600_000,
        metavar="STEPS",
        help="training steps at most for the default learner to reach --share-target (0: skip)",
    )
    parser.add_argument("--share-every", type=int, default=50_000, metavar="STEPS")
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=1,
        help="torch intra-op threads for PPO (0 = torch's default); with this small MLP on a "
        "few busy cores one thread is several times faster than the default",
    )
    study_opts = parser.add_argument_group(
        "study: time the README's commands as subprocesses, print a Markdown table"
    )
    study_opts.add_argument(
        "--study",
        nargs="?",
        const="all",
        metavar="PARTS",
        help=f"comma-separated parts to run: all (default) or {','.join(STUDY_TARGETS)}",
    )
    study_opts.add_argument(
        "--budget",
        type=int,
        default=None,
        help="compare-all's BUDGET (default: total_timesteps among the overrides, else the "
        "Makefile's)",
    )
    study_opts.add_argument(
        "--report-dir", default=None, help="default: <project root>/reports/bench/<time>"
    )
    study_opts.add_argument(
        "--work-dir",
        default=None,
        help="where the temporary roots go, kept afterwards (default: a temporary folder, "
        "removed at the end)",
    )
    study_opts.add_argument(
        "overrides",
        nargs="*",
        metavar="OVERRIDE",
        help="Hydra overrides for the dataset, run and compare-all commands, as make's ARGS "
        "(e.g. total_timesteps=2000)",
    )
    args = parser.parse_args(argv)
    if args.study is None:
        if args.overrides or args.budget is not None or args.report_dir or args.work_dir:
            parser.error("overrides, --budget, --report-dir and --work-dir need --study")
    else:
        parts = _study_parts(args.study, parser)
        if any(_key(o) == "site" for o in args.overrides):
            parser.error("give the site as --site, not as an override")
        args.steps = args.steps or 1000
        try:
            code = study(args, parts)
        except KeyboardInterrupt:
            print("interrupted: the study stopped (its temporary roots removed)", file=sys.stderr)
            code = 130
        sys.exit(code)
    args.steps = args.steps or 2000
    if args.torch_threads > 0:
        import torch

        torch.set_num_threads(args.torch_threads)

    typed, agent_cfg = speed.compose(args.site, with_agent=True)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        ds = dataset.build(typed.site, tmp)
        build_s = time.perf_counter() - t0
        actions = speed.random_actions(ds, args.steps)
        n = len(actions)
        t0 = time.perf_counter()
        TwinData.load(ds)
        twin_load_s = time.perf_counter() - t0
        raw, wrapped, unsafe, twin, vec = [], [], [], [], []
        # Interleaved repeats, best of each: the least disturbed by other load on the machine.
        for _ in range(args.repeats):
            raw.append(speed.raw_citylearn_steps_per_s(ds.schema_path, actions))
            wrapped.append(speed.pvbess_steps_per_s(ds, actions, safety=True))
            unsafe.append(speed.pvbess_steps_per_s(ds, actions, safety=False))
            twin.append(speed.pvbess_steps_per_s(ds, actions, safety=True, backend="twin"))
            vec.append(speed.twin_vec_steps_per_s(ds, args.n_envs, 8 * n * args.n_envs // 16))
        lp = speed.lp_figures(ds)
        ppo = speed.ppo_steps_per_s(ds, args.ppo_steps)
        ppo_twin = speed.ppo_steps_per_s(ds, args.ppo_steps, backend="twin")
        ppo_vec = speed.ppo_steps_per_s(ds, args.twin_ppo_steps, n_envs=args.n_envs)
        share = None
        if args.share_budget > 0:
            from pvbess.sim.env import levers_label

            e = typed.env
            levers = levers_label(
                e.observations,
                e.action_mode,
                e.reward_baseline,
                e.normalize,
                e.battery_action,
                e.residual_frac,
                e.ev_action,
                e.planner_arrivals,
                e.ev_residual_frac,
                e.planner_forecast,
            )
            print(
                f"default learner ({agent_cfg['_target_'].rsplit('.', 1)[-1]}, {levers}, "
                f"{args.site}, reward {typed.reward.name}) "
                f"to {args.share_target:g} % of the optimum's gain:"
            )
            share = speed.time_to_share(
                typed,
                agent_cfg,
                tmp,
                target_pct=args.share_target,
                budget=args.share_budget,
                every=args.share_every,
            )
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    threads = args.torch_threads or "default"
    print(
        f"site={args.site}  sockets={ds.n_sockets}  steps/measurement={n}  repeats={args.repeats}"
        f"  torch threads={threads}"
    )
    print(f"  dataset build (uncached)        {build_s:10.2f} s")
    print(f"  CityLearn raw, random actions   {max(raw):10.1f} steps/s")
    print(
        f"  pvbess env, same actions        {max(wrapped):10.1f} steps/s  "
        f"ratio {max(wrapped) / max(raw):.3f} (target >= 0.95)"
    )
    print(
        f"  pvbess env, no safety layer     {max(unsafe):10.1f} steps/s  "
        f"ratio {max(unsafe) / max(raw):.3f}"
    )
    print(
        f"  pvbess env on the twin          {max(twin):10.1f} steps/s  "
        f"x{max(twin) / max(raw):.0f} CityLearn raw (twin data load {twin_load_s:.2f} s)"
    )
    print(f"  twin VecEnv, {args.n_envs:3d} copies         {max(vec):10.1f} env steps/s")
    print(f"  PPO training end to end         {ppo:10.1f} env steps/s ({args.ppo_steps} steps)")
    print(
        f"  PPO on the twin                 {ppo_twin:10.1f} env steps/s ({args.ppo_steps} steps)"
    )
    print(
        f"  PPO on the twin VecEnv ({args.n_envs:3d})   {ppo_vec:10.1f} env steps/s "
        f"({args.twin_ppo_steps} steps)"
    )
    print(
        f"  optimum LP (HiGHS), reward=balanced: solve {lp['lp/solve_seconds']:.2f} s, "
        f"{lp['lp/variables']:,.0f} variables, {lp['lp/constraints']:,.0f} constraints, "
        f"peak memory during the solve {lp.get('lp/peak_memory_mb', float('nan')):,.0f} MB "
        "(target: under 60 s)"
    )
    if share is not None:
        reached = share["seconds_to_target"] == share["seconds_to_target"]  # not nan
        print(
            f"  default learner to {args.share_target:g} % of the optimum's gain      "
            + (
                f"{share['seconds_to_target']:.0f} s, {share['steps_to_target']:,.0f} steps"
                if reached
                else f"not within {args.share_budget:,d} steps"
            )
            + f"; best {share['best_share_pct']:.1f} % at {share['best_steps']:,.0f} steps "
            f"({share['best_seconds']:.0f} s of training, evaluations excluded)"
        )
    print(f"  peak memory (RSS)               {peak_mb:10.0f} MB")


if __name__ == "__main__":
    main()
