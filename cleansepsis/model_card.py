"""Model cards: a README.md in each checkpoint folder saying what the policy is and how it was measured."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from cleansepsis.io import atomic_file

ICU_SEPSIS_SOURCE = "icu-sepsis"
SIMULATOR_SOURCE = "vancomycin-sim"
MIMIC_SOURCE = "mimic-iv"

NOTICE = (
    "**For research only; not for treating patients.** This policy was learned offline from logged "
    "episodes (retrospective ICU records or a simulator's) and has not been validated prospectively. It must not be used to make or support treatment decisions."
)


def _fmt(x: Any, digits: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def _estimate(e: dict[str, Any]) -> str:
    return f"{_fmt(e.get('estimate'))} [{_fmt(e.get('ci_low'))}, {_fmt(e.get('ci_high'))}]"


def model_card(config: dict[str, Any], evaluation: dict[str, Any] | None, run: dict[str, Any]) -> str:
    """The text of a model card. `evaluation` is this policy's entry of evaluation.json (or None);
    `run` the evaluation's shared settings (replay, split, epsilon, behaviour). A continuous-dose policy
    gets `continuous_model_card`."""
    if is_continuous_config(config):
        return continuous_model_card(config, evaluation, run)
    algo = config.get("algo", "unknown algorithm")
    outputs = config.get("outputs")
    acts = (
        "acts greedily on its Q-values over the admissible actions"
        if outputs == "q_values"
        else "samples from the softmax of its logits"
    )
    lines = [
        f"# Model card: {algo} policy, setting {config.get('setting', '?')}, seed {config.get('seed', '?')}",
        "",
        NOTICE,
        "",
        "## What it is",
        f"- Algorithm: {algo}; hyperparameters: {config.get('hparams', {})}; seed {config.get('seed')}.",
        f"- Network: {config.get('network', {}).get('kind')} ({config.get('network', {}).get('activation')}), "
        f"{config.get('obs_dim')} inputs -> {config.get('n_actions')} outputs ({outputs}); the policy {acts}.",
        "- Actions: `5 * fluid_level + vaso_level`, each level 0 (none) to 4. Load it with "
        "`cleansepsis.load_policy(this_folder, replay)`; `decode_action(a)` gives the dose ranges.",
        "",
        "## Data and cohort",
        f"- Replay: `{config.get('replay_path')}` (content hash `{str(config.get('replay_hash'))[:16]}...`), "
        f"source `{config.get('replay_source')}`, env `{config.get('env_id')}`.",
        f"- Inputs: {len(config.get('feature_names') or [])} features "
        f"({', '.join((config.get('feature_names') or [])[:6])}, ...); normalisation: "
        f"{str(config.get('normalisation'))[:200]}.",
    ]
    is_icu_sepsis = config.get("replay_source") == ICU_SEPSIS_SOURCE
    if config.get("action_bins"):
        bins = config["action_bins"]
        lines.append(
            f"- Dose levels: vasopressor edges {bins.get('vaso_edges')} {bins.get('vaso_unit')}, "
            f"fluid edges {bins.get('fluid_edges')} {bins.get('fluid_unit')}."
        )
    elif is_icu_sepsis:
        lines.append(
            "- ICU-Sepsis (Choudhary et al. 2024): a tabular MDP built from MIMIC-III with the AI Clinician "
            "cohort; the dose levels are that cohort's quartile bins."
        )
    lines += ["", "## Reward", f"- {run.get('reward') or 'see the replay metadata'}", ""]
    lines += ["## Evaluation", ""]
    if evaluation is None:
        lines.append("Not evaluated yet: run `python -m cleansepsis.evaluate RUN_DIR`.")
    else:
        est = evaluation["ope"]["estimators"]
        weights = evaluation["ope"]["weights"]
        observed = run.get("observed_return") or {}
        observed_text = _fmt(observed.get("mean") if observed else evaluation["ope"].get("observed_return"), 4)
        if run.get("heldout"):
            lines += [f"Held-out data drawn for this evaluation: {run['heldout']['note']}.", ""]
        lines += [
            f"Measured by `python -m cleansepsis.evaluate` on split `{run.get('split')}` of "
            f"`{run.get('replay_path')}` ({evaluation['ope']['n_episodes']} episodes, "
            f"{evaluation['ope']['n_transitions']} transitions); gamma {evaluation['ope']['gamma']}.",
            f"Behaviour policy: {run.get('behavior', {}).get('source')}. Target softened with epsilon "
            f"{evaluation['ope']['epsilon']} for importance sampling; clip {evaluation['ope']['clip']}. "
            "Intervals: 95% bootstrap over episodes.",
            "",
            "| estimator | estimate [95% interval] | clinicians observed |",
            "|---|---|---|",
        ]
        lines += [f"| {name.upper()} | {_estimate(e)} | {observed_text} |" for name, e in est.items()]
        identified = est.get("fqe", {}).get("ci_identified")
        if identified is not None:
            lines.append(f"| FQE, identified interval (`ci_identified`) | {_fmt(est['fqe']['estimate'])} "
                         f"[{_fmt(identified[0])}, {_fmt(identified[1])}] | {observed_text} |")  # fmt: skip
            note = (f"FQE's identified interval: {est['fqe'].get('interval_identified')}. The FQE row's "
                    "interval is the fitting interval, which cannot show the value of actions the data never "
                    "logged.")  # fmt: skip
        else:
            note = None
        if evaluation.get("exact"):
            ex = evaluation["exact"]
            lines.append(
                f"| exact (ICU-Sepsis, softened / as is) | {_fmt(ex['value_softened'], 4)} / {_fmt(ex['value'], 4)} "
                f"| {observed_text} |"
            )
        if note:
            lines += ["", note]
        lines += ["", "The clinicians' observed return is the mean return per episode of the logged behaviour on "
                  "the same episodes: the reference every estimate should be read against."]  # fmt: skip
        warnings = evaluation["ope"].get("warnings") or []
        thresholds = run.get("thresholds")
        if warnings:
            lines += ["", "**Warnings** (the estimates above are not to be trusted as they stand):"]
            lines += [f"- {w['message']}." for w in warnings]
        else:
            lines += ["", "Warnings: none fired."]
        if thresholds:
            lines.append(
                f"(Thresholds: fewer than {thresholds['small_held_out_episodes']} held-out episodes; ESS below "
                f"{100 * thresholds['min_ess_share']:.0f}% of the episodes or below {thresholds['min_ess']}; "
                "largest weight above "
                f"{100 * thresholds['max_weight_share']:.0f}% of the total; behaviour-model ECE above "
                f"{thresholds['max_behavior_ece']}.)"
            )
        lines += [
            "",
            f"Importance weights: ESS {_fmt(weights['ess'], 1)} of {weights['n_episodes']} episodes, largest "
            f"weight {_fmt(weights['max_weight'], 3)}, {100 * weights['share_clipped']:.1f}% clipped, "
            f"{100 * weights['share_zero_weight']:.1f}% zero.",
        ]
        safety = evaluation["safety"]
        lines += [
            "",
            f"Agreement with clinicians: {100 * safety['agreement']['action']:.1f}% of actions "
            f"(vasopressor level {100 * safety['agreement']['vaso_level']:.1f}%, fluid level "
            f"{100 * safety['agreement']['fluid_level']:.1f}%).",
        ]
        if safety.get("support"):
            s = safety["support"]
            lines.append(
                f"Support: mean behaviour probability of its actions {_fmt(s['support_mass'])}; "
                f"{100 * s['low_support_rate']:.1f}% of its actions have behaviour probability < {s['threshold']}."
            )
        if safety.get("inadmissible_rate") is not None:
            lines.append(f"Inadmissible actions: {100 * safety['inadmissible_rate']:.2f}% of its probability mass.")
        if safety.get("hazards"):
            lines.append("Festor et al. hazards (policy vs clinicians): " + "; ".join(
                f"{k} {_fmt(safety['hazards']['policy'][k]['rate'])} vs {_fmt(safety['hazards']['clinicians'][k]['rate'])}"
                for k in ("A", "B", "C", "D")
            ))  # fmt: skip
        lines += ["", "Figures in the run folder: `action_heatmap.png`, `q_values.png`, `forest.png`."]
    lines += [
        "",
        "## Limitations",
        "- Off-policy estimates rest on the behaviour policy being right and on no unmeasured confounding;"
        " softening and clipping change what is estimated.",
        "- Values are not comparable with other papers' numbers unless cohort, reward, action bins and"
        " evaluation choices all match (Luo et al. 2024).",
    ]
    if is_icu_sepsis:
        lines.append(
            "- ICU-Sepsis is a model of MIMIC-III patients; doing well on it is not evidence of benefit to patients."
        )
    lines += [
        "- Dose levels are coarse (5 x 5); timing, drug choice and patient context beyond the features are not modelled.",
        "",
        NOTICE,
        "",
    ]
    return "\n".join(lines)


def is_continuous_config(config: dict[str, Any]) -> bool:
    return config.get("outputs") == "action_mean" or (config.get("action_space") or {}).get("kind") == "continuous"


def _source_lines(source: Any) -> list[str]:
    if source == SIMULATOR_SOURCE:
        return ["- Source: simulated patients, not people. `cleansepsis.vancomycin` (two-compartment population "
                "pharmacokinetics of Goti et al. 2018, with modelling choices for the population, kidney injury and "
                "level draws) dosed by a clinician-like policy. Every value below is the simulator's; doing well in "
                "it is not evidence of benefit to patients."]  # fmt: skip
    if source == MIMIC_SOURCE:
        return ["- Source: MIMIC-IV (retrospective ICU records; credentialed data). Its dynamics are unknown, so "
                "the policy's value can only be estimated off-policy, from the logged doses."]  # fmt: skip
    return [f"- Source: `{source}` (not one this card knows; read the replay's metadata)."]


def continuous_model_card(config: dict[str, Any], evaluation: dict[str, Any] | None, run: dict[str, Any]) -> str:
    """The model card of a continuous-dose policy (iql_continuous.py and its `--bc`). `evaluation` is this
    policy's entry of a continuous evaluation.json (cleansepsis/evaluate_continuous.py) or None; `run` may
    carry `simulation` (this policy's simulated value from training: value, stderr, n_patients and the
    clinician/oracle references on the same patients) and the evaluation's shared settings."""
    algo = config.get("algo", "unknown algorithm")
    space = config.get("action_space") or {}
    unit, low, high = space.get("unit", "?"), space.get("low"), space.get("high")
    dose = f"{space.get('name', 'dose')} in {unit}"
    network = config.get("network") or {}
    features = config.get("feature_names") or []
    lines = [
        f"# Model card: {algo} policy (continuous dose), setting {config.get('setting', '?')}, seed "
        f"{config.get('seed', '?')}",
        "",
        NOTICE,
        "",
        "## What it is",
        f"- Algorithm: {algo}; hyperparameters: {config.get('hparams', {})}; seed {config.get('seed')}; "
        f"{config.get('updates', '?')} updates.",
        f"- Network: {network.get('kind')} ({network.get('activation')}), {config.get('obs_dim')} inputs -> the "
        f"mean of a Gaussian over the dose; the policy acts by that mean (deterministic).",
        f"- Action: the {dose}, bounds [{low:g}, {high:g}] {unit}; every dose it gives is inside them. "
        "Load it with `cleansepsis.load_policy(this_folder, replay)`; `select_action(obs)` gives the dose in "
        f"{unit}.",
        "",
        "## Data and cohort",
        f"- Replay: `{config.get('replay_path')}` (content hash `{str(config.get('replay_hash'))[:16]}...`), "
        f"source `{config.get('replay_source')}`, env `{config.get('env_id')}`.",
        *_source_lines(config.get("replay_source")),
        f"- Inputs: {len(features)} features ({', '.join(features[:6])}{', ...' if len(features) > 6 else ''}), "
        f"raw physical units; normalisation: {str(config.get('normalisation'))[:200]}.",
        "",
        "## Reward",
        f"- {run.get('reward') or 'see the replay metadata'}",
        "",
        "## Evaluation",
        "",
    ]
    simulation = run.get("simulation")
    if simulation:
        lines += [
            f"Simulated value (mean undiscounted return, acting by its mean, {simulation['n_patients']} simulated "
            f"patients): **{_fmt(simulation['value'], 4)} +- {_fmt(simulation['stderr'], 4)}** (SE); on the same "
            f"patients the clinician-like policy {_fmt(simulation['clinician'], 4)} and the oracle "
            f"{_fmt(simulation['oracle'], 4)}.",
            "",
        ]
    if evaluation is None:
        lines.append("Off-policy evaluation: not run yet (`python -m cleansepsis.evaluate RUN_DIR`).")
    else:
        ope = evaluation["ope"]
        sim = evaluation.get("simulated")
        lines += [
            f"Measured by `python -m cleansepsis.evaluate` on split `{run.get('split')}` of "
            f"`{run.get('replay_path')}` ({ope['n_episodes']} episodes, {ope['n_transitions']} transitions); gamma "
            f"{ope['gamma']}; acting: {evaluation.get('acting')}. FQE's Q inputs: "
            f"{ope['estimators'].get('fqe', {}).get('q_inputs', 'observation only')}.",
            "",
            "| estimator | estimate [95% interval] |",
            "|---|---|",
        ]
        for name, e in ope["estimators"].items():
            value = e.get("estimate")
            text = "undefined" if value is None or not math.isfinite(value) else _estimate(e)
            lines.append(f"| {name.upper()} | {text} |")
        lines.append(f"| observed return of the logged policy | {_fmt(ope.get('observed_return'), 4)} |")
        if sim:
            lines.append(f"| simulated (Monte Carlo, {sim['n_patients']} patients) | {_fmt(sim['value'], 4)} +- "
                         f"{_fmt(sim['stderr'], 4)} (SE) |")  # fmt: skip
        if ope.get("undefined"):
            lines += ["", f"Importance sampling undefined: {ope['undefined']}."]
        warnings = ope.get("warnings") or []
        lines += ["", "**Warnings**:" if warnings else "Warnings: none fired."]
        lines += [f"- {w['message']}." for w in warnings]
        doses = evaluation.get("doses")
        if doses:
            lines += [
                "",
                f"Doses at the evaluated states: mean {_fmt(doses['policy_mean'], 1)} {unit} (logged "
                f"{_fmt(doses['logged_mean'], 1)}), mean absolute difference {_fmt(doses['mean_abs_difference'], 1)}"
                f" {unit}, median ratio to the logged dose {_fmt(doses['median_ratio'])}, "
                f"{100 * doses['within_20_percent']:.1f}% within 20% of it.",
            ]
    lines += [
        "",
        "## Limitations",
        "- Off-policy estimates rest on the logged behaviour being known and on no unmeasured confounding.",
        _fqe_limitation(evaluation),
        "- The dose is one Gaussian around the actor's mean: no separate dose/no-dose decision, no timing or drug "
        "choice, nothing about the patient beyond the input features.",
        "- Values are not comparable with other work unless cohort, reward and evaluation choices all match.",
        "",
        NOTICE,
        "",
    ]
    return "\n".join(lines)


def _fqe_limitation(evaluation: dict[str, Any] | None) -> str:
    """What the continuous FQE validation says about the fit this card's estimate came from."""
    fqe = {"history_lags": 7} if evaluation is None else evaluation["ope"]["estimators"].get("fqe", {})
    if fqe.get("history_lags", 0) > 0:  # an evaluation.json without the key predates history FQE
        return ("- FQE fits Q on the observation and the episode's history (the default). On the simulator that fit "
                "was within 2 SE of the true value for the clinicians on 3 of 3 replays, BC on 5 of 7 and IQL on 6 "
                "of 8; it leans low on policies far from the logged one (mean error -0.9 SE for BC, -1.5 SE for "
                "IQL; docs/evaluation.md).")  # fmt: skip
    return ("- FQE on the observation alone: where that is not a Markov state (the simulator's is not) it is biased "
            "for every policy but the logged one: on the simulator it underestimated BC by about 0.2 and IQL by "
            "about 0.34 (docs/evaluation.md); the default fit (history in Q) corrects most of it.")  # fmt: skip


def write_continuous_run_cards(run_dir: str | os.PathLike) -> list[Path]:
    """A model card in every final checkpoint folder of a continuous learner's run (iql_continuous.py), with
    the simulated value of its training summary (summary.json `simulation`) when there is one."""
    run_dir = Path(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    written = []
    for config_path in sorted((run_dir / "checkpoints").glob("*/config.json")):
        config = json.loads(config_path.read_text())
        if not is_continuous_config(config) or config.get("updates") != summary.get("updates_per_policy"):
            continue  # a checkpoint saved during training: no card (the simulated value is the final policy's)
        run = {"simulation": training_simulation(summary, config)}
        written.append(write_model_card(config_path.parent, config, None, run))
    return written


def training_simulation(summary: dict[str, Any], config: dict[str, Any]) -> dict[str, Any] | None:
    """This final checkpoint's simulated value from its run's summary.json (`simulation`), or None."""
    simulation, seeds = summary.get("simulation"), list(summary.get("seeds") or [])
    if not simulation or config.get("seed") not in seeds or config.get("updates") != summary.get("updates_per_policy"):
        return None
    s, i = int(config["setting"]), seeds.index(config["seed"])
    return {"value": simulation["value"][s][i], "stderr": simulation["stderr"][s][i],
            "n_patients": simulation["n_patients"], "clinician": simulation["clinician"]["value"],
            "oracle": simulation["oracle"]["value"]}  # fmt: skip


def write_model_card(
    folder: str | os.PathLike, config: dict[str, Any], evaluation: dict[str, Any] | None, run: dict[str, Any],
    overwrite: bool = True,
) -> Path:
    path = Path(folder) / "README.md"
    with atomic_file(path, overwrite=overwrite) as tmp:
        tmp.write_text(model_card(config, evaluation, run))
    return path
