"""Evaluate every policy of one or more run folders: off-policy estimates, exact values where known,
clinical and safety measures, figures and model cards.

    python -m cleansepsis.evaluate runs/cql__default__20261122-0100 [--replay PATH] [--split test] [--json]
    python -m cleansepsis.evaluate runs/iql__a runs/cql__b            # one comparison table

Writes into each run folder `evaluation.json`, `evaluation.md`, `action_heatmap.png`, `q_values.png`,
`forest.png`, and a model card `README.md` into each checkpoint folder. The behaviour policy is the
replay's logged `behavior_prob`; replays without it (MIMIC-IV) need `--behavior CKPT`, a bc.py policy
trained on a split this evaluation does not use, whose calibration on the evaluated split is reported.
Replays with continuous actions (doses) go to `cleansepsis.evaluate_continuous` (continuous FQE, IS where
the target has a density, simulated true values on the vancomycin simulator).
For research only; not for treating patients.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import jax
import numpy as np
import tyro

from cleansepsis import ope, plots, safety
from cleansepsis.checkpoint import CheckpointError
from cleansepsis.io import OutputExistsError, atomic_file, write_json
from cleansepsis.model_card import NOTICE, write_model_card
from cleansepsis.policy import Policy, PolicyError, load_policy
from cleansepsis.replay import SPLITS, Replay, ReplayError, load_replay

ICU_SEPSIS_SOURCE = "icu-sepsis"
# a fresh held-out ICU-Sepsis replay is drawn with the training replay's seed plus this offset, so that
# its episodes are not the training episodes
HELDOUT_SEED_OFFSET = 1_000_000
OUTPUT_FILES = ("evaluation.json", "evaluation.md", "action_heatmap.png", "q_values.png", "forest.png")


class EvaluationError(ValueError):
    """A run folder or option the evaluation cannot use."""


@dataclass(frozen=True)
class Args:
    run_dirs: tyro.conf.Positional[tuple[Path, ...]]
    """Run folders (runs/<algo>__<name>__<time>) to evaluate; several give one comparison table."""
    replay: Path | None = None
    """Replay to evaluate on; default: the replay the checkpoints were trained on (config replay_path)."""
    split: Literal["train", "val", "test"] = "test"
    """Split of the replay to evaluate on (whole episodes)."""
    json: bool = False
    """Print the evaluation JSON to stdout instead of the tables."""
    behavior: Path | None = None
    """Behaviour-policy checkpoint (bc.py, trained on another split) for replays without behavior_prob."""
    epsilon: float = 0.01
    """Softening of the target policy for importance sampling: (1 - eps) pi + eps uniform(admissible)."""
    clip: float | None = None
    """Cap on cumulative importance weights (none by default)."""
    gamma: float = 1.0
    """Discount of the evaluated return (ICU-Sepsis: 1)."""
    n_boot: int = 200
    """Bootstrap resamples of episodes for the 95% intervals."""
    fqe: Literal["auto", "tabular", "neural"] = "auto"
    """FQE features: one-hot state index (tabular; needs state_index), an MLP on obs, or auto."""
    fqe_iterations: int = 40
    """Neural FQE (discrete actions): fitted-Q iterations (target network refreshes)."""
    fqe_steps: int = 250
    """Neural FQE (discrete actions): Adam steps per iteration."""
    low_support: float = 0.01
    """Behaviour probability below which a policy action counts as low-support."""
    seed: int = 0
    """Seed of the bootstrap and neural FQE."""
    fqe_refits: int = 20
    """Neural FQE (discrete actions): refits on episode resamples (vmapped) for the interval; 0: one fit (omits
    fit noise)."""
    heldout_episodes: int = 2_000
    """ICU-Sepsis replays without the requested split: clinician episodes of the fresh held-out replay."""
    acting: Literal["mean", "sample"] = "mean"
    """Continuous replays: evaluate each policy acting by its mean dose, or sampling (needs its density)."""
    action_samples: int = 4
    """Continuous replays: sampled doses per next state for FQE of a stochastic policy."""
    continuous_fqe_history_lags: int = 7
    """Continuous replays: FQE's Q also sees the episode's this many previous (obs, dose) steps (7, the
    default: the whole history of the simulator's 8-step episodes; 0: Q on the observation only, faster but
    biased for learned policies, docs/evaluation.md)."""
    continuous_fqe_hidden: int = 256
    """Continuous replays: width of FQE's two hidden layers."""
    continuous_fqe_iterations: int = 12
    """Continuous replays: FQE iterations (target refreshes; at least the episode length when gamma is 1)."""
    continuous_fqe_steps: int = 2_000
    """Continuous replays: Adam steps (batch 512) per FQE iteration. The defaults are the fit validated on
    the simulator: about 3.5 min per policy on 10,000 episodes with 5 refits on a 2-core CPU."""
    continuous_fqe_refits: int = 5
    """Continuous replays: FQE refits on episode resamples for the interval (0: the estimate alone; 1: one refit
    beside it, no interval)."""
    sim_patients: int = 100_000
    """Simulator replays (CleanSepsis/Vancomycin-v0): patients for each policy's Monte Carlo true value (0: none)."""
    model_cards: bool = True
    """Write a README.md model card into each checkpoint folder."""
    overwrite: bool = False
    """Replace existing evaluation outputs."""


# ----------------------------------------------------------------------------------------------
# Run folders


def list_checkpoints(run_dir: Path) -> list[dict[str, Any]]:
    """The policies of a run folder: summary.json `runs` entries, or every checkpoints/*/config.json."""
    if not run_dir.is_dir():
        raise EvaluationError(f"{run_dir}: not a run folder (it does not exist or is a file)")
    summary_path = run_dir / "summary.json"
    entries: list[dict[str, Any]] = []
    if summary_path.is_file():
        try:
            summary = json.loads(summary_path.read_text())
        except json.JSONDecodeError as err:
            raise EvaluationError(f"{summary_path}: not valid JSON ({err})") from None
        for entry in summary.get("runs", []):
            if "checkpoint" not in entry:
                raise EvaluationError(f"{summary_path}: a `runs` entry has no 'checkpoint' path")
            entries.append({**entry, "path": run_dir / entry["checkpoint"]})
    else:
        for config in sorted(run_dir.glob("checkpoints/*/config.json")):
            entries.append({"checkpoint": str(config.parent.relative_to(run_dir)), "path": config.parent})
    if not entries:
        raise EvaluationError(f"{run_dir}: no policies found (no summary.json runs and no checkpoints/*/config.json)")
    return entries


# ----------------------------------------------------------------------------------------------
# Behaviour policy


def behaviour_model(replay: Replay, data: Any, args: Args) -> dict[str, Any]:
    """pi_b of the logged actions (N,), the full pi_b (N, A) where known, and how it was obtained."""
    actions = np.asarray(data.action)
    n = len(actions)
    if args.behavior is not None:
        policy = load_policy(args.behavior, replay)
        if policy.outputs != "logits":
            raise EvaluationError(f"{args.behavior}: a behaviour model must output logits (a bc.py policy)")
        probs = np.asarray(policy.action_probs(data.obs), np.float64)
        probs = np.maximum(probs, 1e-6)
        probs /= probs.sum(1, keepdims=True)
        trained_on = policy.config.get("hparams", {}).get("split") or policy.config.get("split") or "train"
        if trained_on == args.split:
            raise EvaluationError(
                f"{args.behavior}: the behaviour model was trained on split {trained_on!r}, the split being "
                "evaluated; train it on another split so its errors do not cancel"
            )
        return {
            "logged": probs[np.arange(n), actions],
            "full": probs,
            "source": f"bc checkpoint {args.behavior} (trained on split {trained_on!r}; floored at 1e-6)",
            "calibration": safety.calibration(probs, actions),
            "clinician_table": None,
        }
    if not replay.has["behavior_prob"]:
        raise EvaluationError(
            f"{replay.path}: the replay has no behavior_prob column; pass --behavior CKPT, a bc.py policy "
            f"trained on a split other than {args.split!r}"
        )
    logged = np.asarray(data.behavior_prob, np.float64)
    full, source, clinician_table = None, "logged behavior_prob column", None
    if replay.meta.get("source") == ICU_SEPSIS_SOURCE and replay.has["state_index"]:
        from cleansepsis import env

        params = env.load_params()
        states = np.asarray(data.state_index)
        for renormalise in (True, False):
            table = np.asarray(env.clinician_policy(params, renormalise=renormalise), np.float64)
            if np.allclose(table[states, actions], logged, atol=1e-5):
                full = table[states]
                clinician_table = table
                source += f" (= ICU-Sepsis clinician policy, renormalise={renormalise})"
                break
    # calibration of the behaviour model on the evaluated (held-out) data, wherever the full model is known
    calibration = None if full is None else safety.calibration(full, actions)
    return {"logged": logged, "full": full, "source": source, "calibration": calibration,
            "clinician_table": clinician_table}  # fmt: skip


# ----------------------------------------------------------------------------------------------
# One policy


def exact_values(policy: Policy, epsilon: float) -> dict[str, float] | None:
    """Exact value on the ICU-Sepsis MDP of the policy and of its softened version, or None."""
    from cleansepsis import env

    if policy.config.get("replay_source") != ICU_SEPSIS_SOURCE or list(policy.config.get("feature_names") or []) != list(
        env.FEATURE_NAMES
    ):
        return None
    params = env.load_params()
    mask = np.asarray(params.admissible_mask)
    table = np.asarray(policy.action_probs(params.state_vectors, mask), np.float64)
    soft = ope.soften(table, epsilon, mask)
    value, length = env.policy_evaluation(table.astype(np.float32), params)
    soft_value, _ = env.policy_evaluation(soft.astype(np.float32), params)
    return {"value": float(value), "value_softened": float(soft_value), "mean_length": float(length)}


def evaluate_probs(
    name: str,
    probs: np.ndarray,
    next_probs: np.ndarray,
    data: Any,
    replay: Replay,
    behaviour: dict[str, Any],
    args: Args,
    extras: dict[str, np.ndarray],
) -> dict[str, Any]:
    """OPE and safety measures of a target policy given as probabilities at obs and next_obs."""
    result = ope.off_policy_evaluation(
        data,
        probs,
        next_probs,
        behaviour["logged"],
        gamma=args.gamma,
        epsilon=args.epsilon,
        clip=args.clip,
        n_boot=args.n_boot,
        key=jax.random.key(args.seed),
        fqe=args.fqe,
        neural_config=ope.NeuralFQEConfig(n_iterations=args.fqe_iterations, steps_per_iteration=args.fqe_steps),
        neural_refits=args.fqe_refits,
        behavior_ece=None if behaviour["calibration"] is None else behaviour["calibration"]["ece"],
        n_states=716 if replay.meta.get("source") == ICU_SEPSIS_SOURCE else None,
        # ICU-Sepsis: reward 1 on survival, else 0, so every Q lies in [0, 1] (gamma <= 1); elsewhere the
        # range of the logged returns-to-go bounds what the data do not identify
        value_bounds=(0.0, 1.0)
        if replay.meta.get("source") == ICU_SEPSIS_SOURCE and args.gamma <= 1
        else None,
        action_mask=np.asarray(data.action_mask) if replay.has["action_mask"] else None,
        next_action_mask=np.asarray(data.next_action_mask) if replay.has["next_action_mask"] else None,
    )
    q_values = result.pop("q_values")
    logged = np.asarray(data.action)
    greedy = probs.argmax(1)
    measures: dict[str, Any] = {
        "agreement": safety.agreement(greedy, logged),
        "doses": safety.dose_distributions(probs, logged),
        "support": None if behaviour["full"] is None else safety.support(probs, behaviour["full"], args.low_support),
        "inadmissible_rate": safety.inadmissible_rate(probs, np.asarray(data.action_mask))
        if replay.has["action_mask"]
        else None,
        "hazards": None,
    }
    if all(c in extras for c in safety.HAZARD_COLUMNS) and replay.meta.get("step_hours"):
        measures["hazards"] = safety.hazards(extras, float(replay.meta["step_hours"]), greedy, logged)
    return {"name": name, "ope": result, "safety": measures, "fqe_q": q_values}


# ----------------------------------------------------------------------------------------------
# One run folder


def _replay_for(entries: list[dict[str, Any]], args: Args) -> Path:
    if args.replay is not None:
        return args.replay
    config = json.loads((entries[0]["path"] / "config.json").read_text())
    if not config.get("replay_path"):
        raise EvaluationError(f"{entries[0]['path']}: config has no replay_path; pass --replay PATH")
    return Path(config["replay_path"])


def _split_is_empty(replay: Replay, split: str) -> bool:
    return split in SPLITS and not np.any(np.asarray(replay.data.split) == SPLITS.index(split))


def heldout_replay_for(replay: Replay, args: Args, log=print) -> tuple[Replay, dict[str, Any] | None]:
    """The replay to evaluate on: `replay` itself, or, when it is an ICU-Sepsis replay without the
    requested split (the default replay has every episode in "train"), a fresh held-out clinician replay
    drawn with another seed (cached), so that no policy is scored on its own training episodes."""
    if not _split_is_empty(replay, args.split) or replay.meta.get("source") != ICU_SEPSIS_SOURCE:
        return replay, None
    if args.split == "train":
        return replay, None  # an empty train split is the replay's own problem: split() names it
    from cleansepsis import icu_replay

    made_by = replay.meta.get("args", {})
    seed = int(made_by.get("seed", 0)) + HELDOUT_SEED_OFFSET
    strategy = made_by.get("strategy", "mean")
    path = icu_replay.heldout_replay_path(args.split, args.heldout_episodes, seed, strategy)
    note = (
        f"{replay.path} has no {args.split!r} split: evaluated on a fresh held-out ICU-Sepsis replay of "
        f"{args.heldout_episodes} clinician episodes drawn with seed {seed} (training replay seed "
        f"{made_by.get('seed', 'unknown')} + {HELDOUT_SEED_OFFSET}), cached at {path}"
    )
    log(note)
    return load_replay(path), {
        "drawn": True, "path": str(path), "episodes": args.heldout_episodes, "seed": seed,
        "training_replay": str(replay.path), "note": note,
    }  # fmt: skip


def observed_return(data: Any, gamma: float) -> dict[str, float]:
    """The clinicians' observed mean (discounted) return per episode on the evaluated split, with a 95%
    percentile bootstrap interval over episodes: the reference every estimate should be read against."""
    episode = np.unique(np.asarray(data.episode_id), return_inverse=True)[1].reshape(-1)
    discounted = np.asarray(data.reward, np.float64) * gamma ** np.asarray(data.t, np.float64)
    returns = np.bincount(episode, weights=discounted)
    rng = np.random.default_rng(0)
    boot = returns[rng.integers(0, len(returns), (1000, len(returns)))].mean(1)
    lo, hi = np.quantile(boot, [0.025, 0.975])
    return {"mean": float(returns.mean()), "ci_low": float(lo), "ci_high": float(hi), "n_episodes": len(returns)}


def evaluate_run(run_dir: Path, args: Args, log=print) -> dict[str, Any]:
    entries = list_checkpoints(run_dir)
    if not args.overwrite:
        for name in OUTPUT_FILES:
            if (run_dir / name).exists():
                raise OutputExistsError(f"{run_dir / name} already exists; pass --overwrite to replace it")
    if args.heldout_episodes < 1:
        raise EvaluationError(f"--heldout-episodes must be at least 1, got {args.heldout_episodes}")
    replay = load_replay(_replay_for(entries, args))
    from cleansepsis.evaluate_continuous import check_fqe_options

    check_fqe_options(args, replay)  # a wrong FQE option is an error before anything is drawn or compiled
    replay, heldout = heldout_replay_for(replay, args, log)
    if replay.is_continuous:
        from cleansepsis import evaluate_continuous

        return evaluate_continuous.evaluate_run(run_dir, entries, replay, args, log)
    data = replay.split(args.split)
    extras = replay.extras_for(args.split)
    behaviour = behaviour_model(replay, data, args)
    log(f"{run_dir}: {len(entries)} policies on {replay.path} split {args.split} ({data.size} transitions)")

    observed = observed_return(data, args.gamma)
    policies = []
    if behaviour["clinician_table"] is not None:
        # the clinicians themselves, as a reference row: their value is known on ICU-Sepsis
        from cleansepsis import env

        table = behaviour["clinician_table"]
        next_probs = table[np.asarray(data.next_state_index)]
        clin = evaluate_probs("clinicians", behaviour["full"], next_probs, data, replay, behaviour, args, extras)
        params = env.load_params()
        soft = ope.soften(table, args.epsilon, np.asarray(params.admissible_mask))
        clin["exact"] = {
            "value": float(env.policy_evaluation(table.astype(np.float32), params)[0]),
            "value_softened": float(env.policy_evaluation(soft.astype(np.float32), params)[0]),
        }
        clin["checkpoint"] = None
        policies.append(clin)

    for i, entry in enumerate(entries):
        policy = load_policy(entry["path"], replay)
        if getattr(policy, "is_continuous", False):
            raise EvaluationError(f"{entry['path']}: a continuous-dose policy, but {replay.path} has discrete actions")
        mask = np.asarray(data.action_mask) if replay.has["action_mask"] else None
        next_mask = np.asarray(data.next_action_mask) if replay.has["next_action_mask"] else None
        probs = np.asarray(policy.action_probs(data.obs, mask), np.float64)
        next_probs = np.asarray(policy.action_probs(data.next_obs, next_mask), np.float64)
        name = Path(entry["checkpoint"]).name
        result = evaluate_probs(name, probs, next_probs, data, replay, behaviour, args, extras)
        result.update(
            checkpoint=entry["checkpoint"],
            algo=policy.config.get("algo"),
            seed=policy.config.get("seed"),
            setting=policy.config.get("setting"),
            hparams=policy.config.get("hparams"),
            exact=exact_values(policy, args.epsilon),
            outputs=policy.outputs,
        )
        if i == 0:
            result["policy_outputs_sample"] = _q_figure_values(policy, data, replay)
        policies.append(result)
        fqe = result["ope"]["estimators"]["fqe"]["estimate"]
        wis = result["ope"]["estimators"]["wis"]["estimate"]
        exact = result["exact"]["value"] if result["exact"] else None
        warn = ", ".join(w["code"] for w in result["ope"]["warnings"]) or "none"
        log(f"  [{i + 1}/{len(entries)}] {name}: FQE {fqe:.4f} WIS {wis:.4f} exact {exact} "
            f"(clinicians observed {observed['mean']:.4f}; warnings: {warn})")  # fmt: skip

    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(args).items() if k not in ("run_dirs", "json")}
    report = {
        "run_dir": str(run_dir),
        "replay": {
            "path": str(replay.path),
            "content_hash": replay.content_hash,
            "source": replay.meta.get("source"),
            "env_id": replay.meta.get("env_id"),
            "reward": replay.meta.get("reward"),
            "split": args.split,
            "heldout": heldout,
        },
        "settings": settings,
        "behavior": {"source": behaviour["source"], "calibration": behaviour["calibration"]},
        "observed_return": observed,
        "thresholds": ope.warning_thresholds(),
        "warnings": sorted({w["code"] for p in policies for w in p["ope"]["warnings"]}),
        "policies": [_public(p) for p in policies],
        "notice": NOTICE,
    }
    write_outputs(run_dir, report, policies, args)
    return report


def _q_figure_values(policy: Policy, data: Any, replay: Replay) -> dict[str, Any]:
    """The network's outputs over states sorted by SOFA: all ICU-Sepsis patient states, else up to 400
    evaluated states."""
    if replay.meta.get("source") == ICU_SEPSIS_SOURCE and policy.obs_dim == 47:
        from cleansepsis import env

        params = env.load_params()
        order = np.argsort(np.asarray(params.sofa)[: env.N_PATIENT_STATES], kind="stable")
        obs = np.asarray(params.state_vectors)[order]
        label = f"ICU-Sepsis patient states ({env.N_PATIENT_STATES}), sorted by SOFA"
    else:
        obs = np.asarray(data.obs)
        rows = np.linspace(0, len(obs) - 1, min(400, len(obs))).astype(int)
        obs = obs[rows]
        label = f"{len(rows)} evaluated states (evenly spaced rows)"
    return {"values": np.asarray(policy.outputs_of(obs)), "label": label, "outputs": policy.outputs}


def _public(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in ("fqe_q", "policy_outputs_sample")}


# ----------------------------------------------------------------------------------------------
# Outputs


def _est(e: dict[str, Any]) -> str:
    if not np.isfinite(e["estimate"]):
        return "n/a (all weights 0)"
    return f"{e['estimate']:.4f} [{e['ci_low']:.4f}, {e['ci_high']:.4f}]"


def markdown(report: dict[str, Any]) -> str:
    s = report["settings"]
    lines = [
        f"# Evaluation of `{report['run_dir']}`",
        "",
        report["notice"],
        "",
        f"Replay `{report['replay']['path']}` (source {report['replay']['source']}, hash "
        f"`{report['replay']['content_hash'][:16]}...`), split `{report['replay']['split']}`. Reward: "
        f"{report['replay']['reward']}.",
        f"Behaviour policy: {report['behavior']['source']}. Target softened with epsilon {s['epsilon']} "
        f"(uniform over admissible actions); weight clip {s['clip']}; gamma {s['gamma']}; {s['n_boot']} "
        "bootstrap resamples of episodes for 95% intervals; FQE features: "
        f"{report['policies'][0]['ope']['estimators']['fqe']['features']}.",
        "",
    ]
    heldout = report["replay"].get("heldout")
    if heldout:
        lines += [f"**Held-out data drawn for this evaluation:** {heldout['note']}.", ""]
    obs = report["observed_return"]
    lines += [
        "## Off-policy estimates",
        "",
        f"Clinicians' observed return on these {obs['n_episodes']} episodes: **{obs['mean']:.4f}** "
        f"[{obs['ci_low']:.4f}, {obs['ci_high']:.4f}] (mean per episode, 95% bootstrap interval). It is the "
        "value of the logged behaviour, the reference every estimate below should be read against.",
        "",
        "| policy | WIS | PDWIS | WDR | FQE | clinicians observed | exact (softened) | ESS | max weight | clipped "
        "| warnings |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for p in report["policies"]:
        e, w = p["ope"]["estimators"], p["ope"]["weights"]
        exact = f"{p['exact']['value']:.4f} ({p['exact']['value_softened']:.4f})" if p.get("exact") else "unknown"
        codes = ", ".join(x["code"] for x in p["ope"]["warnings"]) or "none"
        lines.append(
            f"| {p['name']} | {_est(e['wis'])} | {_est(e['pdwis'])} | {_est(e['wdr'])} | {_est(e['fqe'])} | "
            f"{obs['mean']:.4f} | {exact} | {w['ess']:.1f} / {w['n_episodes']} | {w['max_weight']:.3g} | "
            f"{100 * w['share_clipped']:.1f}% | {codes} |"
        )
    lines += ["", _small_sample_intervals_markdown(report)]
    lines += ["", _warnings_markdown(report)]
    lines += [
        "",
        "## Clinical and safety measures",
        "",
        "| policy | agreement (action / vaso / fluid) | support mass | low-support rate | inadmissible |",
        "|---|---|---|---|---|",
    ]
    for p in report["policies"]:
        m = p["safety"]
        a = m["agreement"]
        sup = m["support"]
        mass = "n/a" if sup is None else f"{sup['support_mass']:.3f}"
        low = "n/a" if sup is None else _pct(sup["low_support_rate"])
        inadmissible = "n/a" if m["inadmissible_rate"] is None else f"{100 * m['inadmissible_rate']:.2f}%"
        lines.append(
            f"| {p['name']} | {100 * a['action']:.1f}% / {100 * a['vaso_level']:.1f}% / {100 * a['fluid_level']:.1f}% | "
            f"{mass} | {low} | {inadmissible} |"
        )
    hazard_rows = [p for p in report["policies"] if p["safety"]["hazards"]]
    if hazard_rows:
        lines += ["", "## Festor et al. 2022 hazards (share of applicable states; policy vs clinicians)", ""]
        lines += ["| policy | " + " | ".join(safety.HAZARDS) + " |", "|---|---|---|---|---|"]
        for p in hazard_rows:
            h = p["safety"]["hazards"]
            cells = [
                f"{_pct(h['policy'][k]['rate'])} vs {_pct(h['clinicians'][k]['rate'])} (n={h['policy'][k]['n_states']})"
                for k in safety.HAZARDS
            ]
            lines.append(f"| {p['name']} | " + " | ".join(cells) + " |")
        lines += [""] + [f"- {k}: {v}" for k, v in safety.HAZARDS.items()]
    cal = report["behavior"]["calibration"]
    if cal:
        lines += ["", f"## Behaviour model calibration (split {report['replay']['split']})", "",
                  f"ECE {cal['ece']:.4f}, accuracy {cal['accuracy']:.3f}, mean log-likelihood "
                  f"{cal['mean_log_likelihood']:.3f}.", "", "| confidence bin | n | confidence | accuracy |",
                  "|---|---|---|---|"]  # fmt: skip
        lines += [f"| {b['bin'][0]:.1f}-{b['bin'][1]:.1f} | {b['n']} | {b['confidence']:.3f} | {b['accuracy']:.3f} |"
                  for b in cal["reliability"]]  # fmt: skip
    lines += ["", "Figures: `action_heatmap.png`, `q_values.png`, `forest.png`.", ""]
    return "\n".join(lines)


def _interval(bounds: list[float] | None) -> str:
    if bounds is None or not all(np.isfinite(b) for b in bounds):
        return "n/a"
    return f"[{bounds[0]:.4f}, {bounds[1]:.4f}]"


def _small_sample_intervals_markdown(report: dict[str, Any]) -> str:
    """The intervals beside the percentile bootstrap (docs/evaluation.md, coverage on small held-out sets)."""
    fqe0 = report["policies"][0]["ope"]["estimators"]["fqe"]
    lines = [
        "### Intervals that carry more of the small-sample uncertainty",
        "",
        f"- **FQE identified interval** (`ci_identified`): {fqe0.get('interval_identified')}. The identified "
        "set is the same without sampling noise. The FQE interval in the table above (`ci_low`, `ci_high`) "
        "is the fitting interval: it cannot show the value of actions the data never logged.",
        f"- **WDR**: {report['policies'][0]['ope']['estimators']['wdr'].get('interval')} (the table above). "
        "With tabular FQE this refits FQE on every resample, so the interval carries the model's "
        "uncertainty; the old interval with FQE's full-data Q held fixed undercovers on small held-out sets "
        "and is kept as `ci_fixed_model`.",
        "",
        "| policy | FQE identified interval | FQE identified set | WDR with Q fixed (`ci_fixed_model`) |",
        "|---|---|---|---|",
    ]
    for p in report["policies"]:
        e = p["ope"]["estimators"]
        lines.append(
            f"| {p['name']} | {_interval(e['fqe'].get('ci_identified'))} | "
            f"{_interval(e['fqe'].get('identified_set'))} | {_interval(e['wdr'].get('ci_fixed_model'))} |"
        )
    return "\n".join(lines)


def _warnings_markdown(report: dict[str, Any]) -> str:
    t = report["thresholds"]
    lines = [
        "### Warnings",
        "",
        f"Thresholds: fewer than {t['small_held_out_episodes']} held-out episodes; ESS below "
        f"{100 * t['min_ess_share']:.0f}% of the episodes or below {t['min_ess']}; the largest episode weight "
        "above "
        f"{100 * t['max_weight_share']:.0f}% of the total weight; behaviour-model ECE on the evaluated data "
        f"above {t['max_behavior_ece']}"
        + ("" if report["behavior"]["calibration"] else " (not computed: only the logged action's behaviour "
           "probability is known)") + ".",
        "",
    ]
    flagged = [p for p in report["policies"] if p["ope"]["warnings"]]
    if not flagged:
        return "\n".join([*lines, "None fired."])
    for p in flagged:
        lines += [f"- **{p['name']}**: " + "; ".join(w["message"] for w in p["ope"]["warnings"]) + "."]
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def write_outputs(run_dir: Path, report: dict[str, Any], policies: list[dict[str, Any]], args: Args) -> None:
    write_json(run_dir / "evaluation.json", report, overwrite=args.overwrite)
    with atomic_file(run_dir / "evaluation.md", overwrite=args.overwrite) as tmp:
        tmp.write_text(markdown(report))
    learned = [p for p in policies if p.get("checkpoint")]
    clinicians = np.array(learned[0]["safety"]["doses"]["clinicians"]["joint_fluid_by_vaso"])
    pooled = np.mean([p["safety"]["doses"]["policy"]["joint_fluid_by_vaso"] for p in learned], axis=0)
    plots.action_heatmaps(
        run_dir / "action_heatmap.png",
        {"clinicians (logged)": clinicians, f"policies (mean of {len(learned)})": pooled},
        title=f"Actions on split {args.split}, % of states",
        overwrite=args.overwrite,
    )
    sample = learned[0]["policy_outputs_sample"]
    plots.q_heatmap(
        run_dir / "q_values.png",
        sample["values"],
        f"{learned[0]['name']}: network {sample['outputs']}",
        state_label=sample["label"],
        value_label=sample["outputs"],
        overwrite=args.overwrite,
    )
    rows = [
        {"label": p["name"], "estimators": p["ope"]["estimators"],
         "exact": p["exact"]["value_softened"] if p.get("exact") else None}
        for p in policies
    ]  # fmt: skip
    plots.forest_plot(run_dir / "forest.png", rows, title=f"{run_dir.name}: estimates (red: exact, softened)",
                      overwrite=args.overwrite)  # fmt: skip
    if args.model_cards:
        run_info = {
            "split": args.split,
            "replay_path": report["replay"]["path"],
            "behavior": report["behavior"],
            "reward": report["replay"]["reward"],
            "observed_return": report["observed_return"],
            "thresholds": report["thresholds"],
            "heldout": report["replay"].get("heldout"),
        }
        for p in learned:
            folder = run_dir / p["checkpoint"]
            config = json.loads((folder / "config.json").read_text())
            write_model_card(folder, config, _public(p), run_info, overwrite=True)


def comparison_table(reports: list[dict[str, Any]]) -> str:
    """One row per run folder: mean and spread over its policies."""
    lines = [
        "| run | policies | FQE mean (min-max) | WIS mean | clinicians observed | exact mean | agreement | low-support "
        "| warnings |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in reports:
        learned = [p for p in r["policies"] if p.get("checkpoint")]
        fqe = np.array([p["ope"]["estimators"]["fqe"]["estimate"] for p in learned])
        wis = np.array([p["ope"]["estimators"]["wis"]["estimate"] for p in learned])
        exact = [p["exact"]["value"] for p in learned if p.get("exact")]
        agree = np.mean([p["safety"]["agreement"]["action"] for p in learned])
        low = [p["safety"]["support"]["low_support_rate"] for p in learned if p["safety"]["support"]]
        exact_text = f"{np.mean(exact):.4f}" if exact else "unknown"
        low_text = _pct(float(np.mean(low))) if low else "n/a"
        lines.append(
            f"| {Path(r['run_dir']).name} | {len(learned)} | {fqe.mean():.4f} ({fqe.min():.4f}-{fqe.max():.4f}) | "
            f"{np.nanmean(wis):.4f} | {r['observed_return']['mean']:.4f} | {exact_text} | {100 * agree:.1f}% | "
            f"{low_text} | {', '.join(r['warnings']) or 'none'} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv, description=__doc__)

    def log(*parts: Any) -> None:  # progress on stderr, so stdout holds only the report
        print(*parts, file=sys.stderr, flush=True)

    try:
        if not args.run_dirs:
            raise EvaluationError("give at least one run folder")
        reports = [evaluate_run(Path(d), args, log) for d in args.run_dirs]
    except (EvaluationError, ReplayError, CheckpointError, PolicyError, OutputExistsError, ope.OPEError,
            safety.SafetyError) as err:  # fmt: skip
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        out = reports[0] if len(reports) == 1 else {"runs": reports}
        print(json.dumps(out, indent=2, sort_keys=True, default=_json_default))
    else:
        from cleansepsis import evaluate_continuous

        for report in reports:
            print(evaluate_continuous.markdown(report) if evaluate_continuous.is_continuous_report(report)
                  else markdown(report))  # fmt: skip
        if len(reports) > 1:
            continuous = [r for r in reports if evaluate_continuous.is_continuous_report(r)]
            discrete = [r for r in reports if not evaluate_continuous.is_continuous_report(r)]
            if discrete:
                print("## Comparison\n\n" + comparison_table(discrete))
            if continuous:
                print("## Comparison (continuous doses)\n\n" + evaluate_continuous.comparison_table(continuous))
    return 0


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


if __name__ == "__main__":
    sys.exit(main())
