"""`python -m cleansepsis.evaluate` on a replay with continuous actions (doses): the continuous half.

`cleansepsis.evaluate.evaluate_run` hands a continuous replay here. Each policy of the run folder
(`cleansepsis.load_policy`, giving doses in the replay's unit) is evaluated on the requested split with
continuous FQE and, where the target has a density and the replay logs `behavior_log_density`, WIS, PDWIS
and WDR (`cleansepsis.ope_continuous`), beside the logged policy's observed return and the same small-data
warnings as the discrete path. On a vancomycin simulator replay (env id CleanSepsis/Vancomycin-v0) every
policy's true value is also simulated (Monte Carlo over `--sim-patients` patients, with its standard
error), and the clinician-like behaviour policy, whose density the replay logs, is evaluated as a
reference row. FQE's Q sees the observation and the episode's 7 previous (obs, dose) steps by default
(`--continuous-fqe-history-lags`, `-hidden`, `-iterations`, `-steps`, `-refits`; `fqe_config`), the fit
validated on the simulator (docs/evaluation.md); every output names the Q inputs it used. Writes
`evaluation.json`, `evaluation.md` and `forest.png` into the run folder (the 5 x 5 action heatmap and the
Q-value figure are for discrete policies), and a model card (README.md) into each checkpoint folder
(`cleansepsis.model_card.continuous_model_card`).
"""

from __future__ import annotations

from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis import ope, plots
from cleansepsis import ope_continuous as oc
from cleansepsis.io import atomic_file, write_json
from cleansepsis.model_card import NOTICE, training_simulation, write_model_card
from cleansepsis.policy import load_policy
from cleansepsis.replay import Replay, describe_action_space

OUTPUT_FILES = ("evaluation.json", "evaluation.md", "forest.png")


# evaluate.Args field -> (ContinuousFQEConfig field, smallest value)
CONTINUOUS_FQE_OPTIONS = {
    "continuous_fqe_history_lags": ("history_lags", 0),
    "continuous_fqe_hidden": ("hidden", 1),
    "continuous_fqe_iterations": ("n_iterations", 1),
    "continuous_fqe_steps": ("steps_per_iteration", 1),
    "continuous_fqe_refits": (None, 0),
}
# options of the discrete path that the continuous one does not read, with the option that does its job there
DISCRETE_FQE_OPTIONS = {
    "fqe_iterations": "--continuous-fqe-iterations",
    "fqe_steps": "--continuous-fqe-steps",
    "fqe_refits": "--continuous-fqe-refits",
}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _defaults(args: Any) -> dict[str, Any]:
    return {f.name: f.default for f in fields(args)}


def check_fqe_options(args: Any, replay: Replay) -> None:
    """One clear error, before anything is fitted or compiled, for a continuous FQE option out of range,
    one given for a replay of the other kind (it would be silently ignored), or a discrete neural FQE option
    given for a continuous replay."""
    from cleansepsis.evaluate import EvaluationError

    defaults = _defaults(args)
    for name, (_, smallest) in CONTINUOUS_FQE_OPTIONS.items():
        value = getattr(args, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < smallest:
            raise EvaluationError(f"{_option(name)} must be an integer >= {smallest}, got {value!r}")
    if replay.is_continuous:
        for name, instead in DISCRETE_FQE_OPTIONS.items():
            if getattr(args, name) != defaults[name]:
                raise EvaluationError(
                    f"{_option(name)} {getattr(args, name)}: an option of the discrete neural FQE; {replay.path} "
                    f"has continuous doses, whose FQE takes {instead}"
                )
    else:
        for name in CONTINUOUS_FQE_OPTIONS:
            if getattr(args, name) != defaults[name]:
                raise EvaluationError(
                    f"{_option(name)} {getattr(args, name)}: an option of continuous FQE; {replay.path} has "
                    "discrete actions"
                )


def fqe_config(args: Any) -> oc.ContinuousFQEConfig:
    """The continuous FQE fit of the evaluate options (the defaults: the validated history fit)."""
    return oc.ContinuousFQEConfig(**{field: getattr(args, name) for name, (field, _) in CONTINUOUS_FQE_OPTIONS.items()
                                     if field is not None})  # fmt: skip


def continuous_target_of(policy: Any, name: str) -> oc.ContinuousTarget:
    """A loaded continuous-dose checkpoint as a target: it acts by its mean dose (`Policy.action_mean`,
    in the action space's unit). The checkpoints carry no density, so it is deterministic."""
    from cleansepsis.evaluate import EvaluationError

    if not getattr(policy, "is_continuous", False):
        raise EvaluationError(
            f"{policy.path}: a discrete policy ({policy.n_actions} actions); continuous evaluation needs a policy "
            "that gives doses (iql_continuous.py)"
        )
    return oc.deterministic_target(name, policy.action_mean)


def _simulator(replay: Replay):
    """(simulator params, vancomycin module) when the replay comes from the vancomycin simulator, else None."""
    from cleansepsis import vancomycin as V
    from cleansepsis.vancomycin_replay import simulator_params_from_meta

    params = simulator_params_from_meta(replay.meta)
    return None if params is None else (params, V)


def _clinician_is_the_behaviour(data: Any, behavior_log_density: np.ndarray | None, V: Any) -> bool:
    """The replay's logged densities are the simulator clinician's (so its full policy is known)."""
    if behavior_log_density is None:
        return False
    expected = np.asarray(jax.vmap(V.clinician_log_density)(data.obs, data.action), np.float64)
    return bool(np.allclose(expected, behavior_log_density, atol=1e-3, rtol=1e-4))


def simulated_value(target_dose, V: Any, params: Any, n_patients: int, seed: int, policy=None) -> dict[str, Any]:
    """Monte Carlo value (undiscounted return) of a deterministic dose rule obs -> dose, or of a simulator
    `policy`, over `n_patients` simulated patients."""
    if policy is None:

        def policy(key, obs, state, sim_params):
            del key, state, sim_params
            return target_dose(obs[None])[0], jnp.zeros((), jnp.float32)

    # a raw uint32 key (the same stream as jax.random.key(seed)), as the replay builder passes: the clinicians'
    # simulation then shares the replay rollout's compiled program when the patient counts agree
    value, stderr = V.policy_value(jax.random.PRNGKey(seed), params, policy, n_patients)
    return {"value": value, "stderr": stderr, "n_patients": n_patients, "seed": seed,
            "what": "Monte Carlo mean undiscounted return in the simulator the replay was drawn from"}  # fmt: skip


def dose_measures(policy_doses: np.ndarray, logged: np.ndarray) -> dict[str, float]:
    """The policy's doses at the logged states against the logged doses."""
    policy_doses, logged = np.asarray(policy_doses, np.float64), np.asarray(logged, np.float64)
    ratio = policy_doses / np.maximum(logged, 1e-6)
    both_zero = (policy_doses == 0) & (logged == 0)
    return {
        "policy_mean": float(policy_doses.mean()),
        "logged_mean": float(logged.mean()),
        "mean_abs_difference": float(np.abs(policy_doses - logged).mean()),
        "median_ratio": float(np.median(np.where(both_zero, 1.0, ratio))),
        "within_20_percent": float((both_zero | (np.abs(ratio - 1.0) <= 0.2)).mean()),
    }


def evaluate_run(run_dir: Path, entries: list[dict[str, Any]], replay: Replay, args: Any, log=print) -> dict[str, Any]:
    from cleansepsis.evaluate import EvaluationError, observed_return

    if args.behavior is not None:
        raise EvaluationError(
            f"--behavior {args.behavior}: a bc.py model of discrete actions; {replay.path} has "
            f"{describe_action_space(replay.action_space)}, whose behaviour density comes from its "
            "behavior_log_density column"
        )
    if args.fqe == "tabular":
        raise EvaluationError(f"--fqe tabular needs discrete actions; {replay.path} has continuous doses")
    space = replay.action_space
    data = replay.split(args.split)
    behavior_log_density = np.asarray(data.behavior_log_density) if replay.has.get("behavior_log_density") else None
    simulator = _simulator(replay)
    simulate = simulator is not None and args.sim_patients > 0 and args.gamma == 1.0
    log(f"{run_dir}: {len(entries)} policies on {replay.path} split {args.split} ({data.size} transitions, "
        f"{describe_action_space(space)})")  # fmt: skip
    observed = observed_return(data, args.gamma)
    config = fqe_config(args)

    def evaluate_target(name: str, target: oc.ContinuousTarget, acting: str, index: int) -> dict[str, Any]:
        log(f"  FQE of {name} ({acting}) ...")
        result = oc.continuous_off_policy_evaluation(
            data, target, low=float(space["low"]), high=float(space["high"]), gamma=args.gamma,
            behavior_log_density=behavior_log_density, acting=acting, n_action_samples=args.action_samples,
            clip=args.clip, n_boot=args.n_boot, key=jax.random.fold_in(jax.random.key(args.seed), index),
            config=config, n_refits=args.continuous_fqe_refits, progress=f"FQE {name}",
        )  # fmt: skip
        state_doses = result.pop("state_doses")
        result.pop("target_doses")
        return {"name": name, "ope": result, "doses": dose_measures(state_doses, np.asarray(data.action))}

    # every policy loaded and checked before anything is fitted: a wrong one is an error, not half a report
    loaded = []
    for entry in entries:
        policy = load_policy(entry["path"], replay)
        name = Path(entry["checkpoint"]).name
        loaded.append((entry, policy, continuous_target_of(policy, name)))

    n_fits = 1 + (args.continuous_fqe_refits if args.continuous_fqe_refits >= 2 else 0)
    log(f"FQE: Q on {oc.q_inputs(config.history_lags)}, {config.hidden}x2, {config.n_iterations} iterations x "
        f"{config.steps_per_iteration} steps, {n_fits} fits per policy")  # fmt: skip
    policies = []
    if simulator is not None and _clinician_is_the_behaviour(data, behavior_log_density, simulator[1]):
        params, V = simulator
        clinician = oc.simulator_target(
            "clinicians", V.clinician_policy, V.clinician_log_density,
            jax.vmap(lambda o: jnp.clip(V.clinician_rule_dose(o), 0.0, V.DOSE_MAX_MG)),
        )  # fmt: skip
        row = evaluate_target("clinicians", clinician, "sample", 0)
        row.update(checkpoint=None, acting="sample (the logged stochastic policy)")
        row["simulated"] = simulated_value(None, V, params, args.sim_patients, args.seed, V.clinician_policy) \
            if simulate else None  # fmt: skip
        policies.append(row)

    for i, (entry, policy, target) in enumerate(loaded):
        name = target.name
        row = evaluate_target(name, target, args.acting, i + 1)
        row.update(
            checkpoint=entry["checkpoint"], algo=policy.config.get("algo"), seed=policy.config.get("seed"),
            setting=policy.config.get("setting"), hparams=policy.config.get("hparams"), acting=args.acting,
        )  # fmt: skip
        row["simulated"] = None
        if simulate:
            params, V = simulator
            row["simulated"] = simulated_value(target.mean_dose, V, params, args.sim_patients, args.seed)
        policies.append(row)
        fqe = row["ope"]["estimators"]["fqe"]
        sim = row["simulated"]
        warn = ", ".join(w["code"] for w in row["ope"]["warnings"]) or "none"
        log(f"  [{i + 1}/{len(entries)}] {name}: FQE {fqe['estimate']:.4f} +- {fqe['boot_std']:.4f} simulated "
            f"{'unknown' if sim is None else format(sim['value'], '.4f')} (observed {observed['mean']:.4f}; "
            f"warnings: {warn})")  # fmt: skip

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items() if k not in ("run_dirs", "json")}
    report = {
        "run_dir": str(run_dir),
        "action_space": space,
        "replay": {
            "path": str(replay.path), "content_hash": replay.content_hash, "source": replay.meta.get("source"),
            "env_id": replay.meta.get("env_id"), "reward": replay.meta.get("reward"), "split": args.split,
            "heldout": None,
        },
        "settings": settings,
        "behavior": {
            "source": "logged behavior_log_density column" if behavior_log_density is not None else "unknown "
            "(no behavior_log_density column: importance sampling is undefined)",
            "calibration": None,
        },
        "observed_return": observed,
        "thresholds": ope.warning_thresholds(),
        "warnings": sorted({w["code"] for p in policies for w in p["ope"]["warnings"]}),
        "policies": policies,
        "notice": NOTICE,
    }
    write_outputs(run_dir, report, args)
    if getattr(args, "model_cards", False):
        write_cards(run_dir, report)
    return report


def write_cards(run_dir: Path, report: dict[str, Any]) -> None:
    """The continuous model card in each evaluated checkpoint folder, with this evaluation's estimates and
    (from the run's summary.json, when it has one) the simulated value measured in training."""
    import json

    summary_path = run_dir / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
    for p in report["policies"]:
        if not p.get("checkpoint"):
            continue
        folder = run_dir / p["checkpoint"]
        config = json.loads((folder / "config.json").read_text())
        run = {"split": report["replay"]["split"], "replay_path": report["replay"]["path"],
               "reward": report["replay"]["reward"], "simulation": training_simulation(summary, config)}  # fmt: skip
        write_model_card(folder, config, p, run, overwrite=True)


def _est(e: dict[str, Any]) -> str:
    if not np.isfinite(e["estimate"]):
        return "undefined" if e.get("undefined") else "n/a (all weights 0)"
    if not np.isfinite(e.get("ci_low", np.nan)):
        return f"{e['estimate']:.4f}"
    return f"{e['estimate']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}]"


def markdown(report: dict[str, Any]) -> str:
    s, space = report["settings"], report["action_space"]
    obs = report["observed_return"]
    fqe0 = report["policies"][0]["ope"]["estimators"]["fqe"]
    lines = [
        f"# Evaluation of `{report['run_dir']}`", "", report["notice"], "",
        f"Replay `{report['replay']['path']}` (source {report['replay']['source']}, hash "
        f"`{report['replay']['content_hash'][:16]}...`), split `{report['replay']['split']}`, "
        f"{describe_action_space(space)} in [{space['low']}, {space['high']}]. Reward: {report['replay']['reward']}.",
        f"Behaviour density: {report['behavior']['source']}. gamma {s['gamma']}; weight clip {s['clip']}; "
        f"{s['n_boot']} bootstrap resamples of episodes for the IS intervals.",
        f"FQE's Q inputs: **{fqe0.get('q_inputs', 'observation only')}**. FQE: {fqe0['features']}, "
        f"{fqe0['n_iterations']} iterations x {fqe0['steps_per_iteration']} steps; interval: {fqe0['interval']}.",
        "",
        "## Off-policy estimates",
        "",
        f"Logged policy's observed return on these {obs['n_episodes']} episodes: **{obs['mean']:.4f}** "
        f"[{obs['ci_low']:.4f}, {obs['ci_high']:.4f}] (mean per episode, 95% bootstrap interval).",
        "",
        "| policy | acting | FQE | WIS | PDWIS | WDR | observed | simulated (MC +- SE) | ESS | warnings |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]  # fmt: skip
    for p in report["policies"]:
        e, w, sim = p["ope"]["estimators"], p["ope"]["weights"], p.get("simulated")
        sim_text = "unknown" if sim is None else f"{sim['value']:.4f} +- {sim['stderr']:.4f}"
        ess = "n/a" if w is None else f"{w['ess']:.1f} / {w['n_episodes']}"
        codes = ", ".join(x["code"] for x in p["ope"]["warnings"]) or "none"
        lines.append(
            f"| {p['name']} | {p['acting']} | {_est(e['fqe'])} | {_est(e['wis'])} | {_est(e['pdwis'])} | "
            f"{_est(e['wdr'])} | {obs['mean']:.4f} | {sim_text} | {ess} | {codes} |"
        )
    reasons = sorted({p["ope"]["undefined"] for p in report["policies"] if p["ope"]["undefined"]})
    if reasons:
        lines += ["", "Importance sampling undefined: " + "; ".join(reasons) + "."]
    from cleansepsis.evaluate import _warnings_markdown

    lines += ["", _warnings_markdown(report), "", f"## Doses ({space['unit']}) at the evaluated states", "",
              "| policy | policy mean | logged mean | mean abs difference | median ratio to logged | within 20% |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for p in report["policies"]:
        d = p["doses"]
        lines.append(f"| {p['name']} | {d['policy_mean']:.1f} | {d['logged_mean']:.1f} | {d['mean_abs_difference']:.1f} | "
                     f"{d['median_ratio']:.3f} | {100 * d['within_20_percent']:.1f}% |")  # fmt: skip
    lines += ["", "Figure: `forest.png`.", ""]
    return "\n".join(lines)


def write_outputs(run_dir: Path, report: dict[str, Any], args: Any) -> None:
    write_json(run_dir / "evaluation.json", report, overwrite=args.overwrite)
    with atomic_file(run_dir / "evaluation.md", overwrite=args.overwrite) as tmp:
        tmp.write_text(markdown(report))
    rows = [{"label": p["name"], "estimators": p["ope"]["estimators"],
             "exact": p["simulated"]["value"] if p.get("simulated") else None} for p in report["policies"]]  # fmt: skip
    plots.forest_plot(run_dir / "forest.png", rows, title=f"{run_dir.name}: estimates (red: simulated value)",
                      overwrite=args.overwrite)  # fmt: skip


def comparison_table(reports: list[dict[str, Any]]) -> str:
    """One row per run folder: FQE over its policies, and the simulated values where known."""
    lines = ["| run | policies | FQE mean (min-max) | FQE's Q inputs | observed | simulated mean | warnings |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in reports:
        learned = [p for p in r["policies"] if p.get("checkpoint")]
        fqe = np.array([p["ope"]["estimators"]["fqe"]["estimate"] for p in learned])
        sims = [p["simulated"]["value"] for p in learned if p.get("simulated")]
        q_inputs = r["policies"][0]["ope"]["estimators"]["fqe"].get("q_inputs", "observation only")
        lines.append(
            f"| {Path(r['run_dir']).name} | {len(learned)} | {fqe.mean():.4f} ({fqe.min():.4f}-{fqe.max():.4f}) | {q_inputs} | "
            f"{r['observed_return']['mean']:.4f} | {f'{np.mean(sims):.4f}' if sims else 'unknown'} | "
            f"{', '.join(r['warnings']) or 'none'} |"
        )
    return "\n".join(lines)


def is_continuous_report(report: dict[str, Any]) -> bool:
    return (report.get("action_space") or {}).get("kind") == "continuous"

