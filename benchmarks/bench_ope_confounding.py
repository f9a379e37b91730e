"""Where confounding by the hidden diabetes biases each off-policy estimator (Oberst-Sontag simulator).

The physician who logged the data sees diabetes; the learner's observation (obs720) does not. For each
target policy (reference policies acting through obs720, and learner checkpoints trained on an obs720
replay), the exact value (backward induction over the 20 steps on the 1440 full states) is set against
WIS, PDWIS, WDR and FQE computed from `--datasets` independent physician replays of `--episodes`
episodes, under four behaviour / model views:

- `logged`: the logged behaviour probabilities (the physician's true propensities, which depend on
  diabetes): unconfounded importance sampling; FQE (and WDR's model) on the full state.
- `obs720`: what a real user has: the behaviour policy estimated from the observation alone (counts of
  the logged actions per observation on an independent replay of the same size, pseudo-count
  `--alpha` per action), FQE on the observation. Confounded.
- `obs720-limit`: the infinite-data limit of `obs720`'s behaviour model, the physician's policy averaged
  over diabetes with the physician's own state occupancy (FQE as in `obs720`): the bias left when
  estimation noise is gone.
- `full1440`: the contrast, diabetes visible: the same estimation from the full observation (what
  `data_prep.py sepsis-sim --observation full1440` shows a learner). Confounding should disappear.

FQE here is tabular on the view's state and finite-horizon: the exact least-squares fit per (state,
action) as in `cleansepsis.ope.tabular_fqe` (a pair never logged takes its state's mean target), iterated
20 times from zero, so Q_k is the value with k steps left, as the simulator's 20-step episodes need (the
stationary fixed point that `ope.tabular_fqe` solves bootstraps through the time limit; it is reported as
`FQE-inf` for comparison). WDR uses Q_{20-t} at step t. WIS, PDWIS and WDR are `cleansepsis.ope`'s, on the
target softened with `--epsilon`; the exact value is that of the softened target.

    uv run python benchmarks/bench_ope_confounding.py --datasets 5 --episodes 10000 \\
        --checkpoints runs/bc__x/checkpoints/s0_seed0 ...
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from cleansepsis import mdp, ope
from cleansepsis import sepsis_sim as S
from cleansepsis.io import write_json
from cleansepsis.policy import load_policy

VIEWS = ("logged", "obs720", "obs720-limit", "full1440")
ESTIMATORS = ("wis", "pdwis", "wdr", "fqe", "fqe-inf")


@dataclass(frozen=True)
class Args:
    datasets: int = 5
    """Independent physician replays (evaluation datasets)."""
    episodes: int = 10_000
    """Episodes per replay (and per behaviour-fit replay)."""
    seed: int = 1000
    """First evaluation seed; the behaviour model of dataset d is fitted on seed + d + 100,000."""
    epsilon: float = 0.01
    """Softening of each target: (1 - eps) pi + eps uniform (what IS estimates; exact values match it)."""
    alpha: float = 0.5
    """Pseudo-count per action of the estimated behaviour policies."""
    version: str = "v2"
    """Simulator dynamics: v2 or original."""
    checkpoints: tuple[Path, ...] = ()
    """Learner checkpoint folders trained on an obs720 simulator replay, added as targets."""
    json_out: Path | None = None
    """Also write every per-dataset estimate as JSON here."""


# ---------------------------------------------------------------------------------------------------------
# The simulator's exact quantities (float64)
# ---------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Exact:
    tx: np.ndarray  # (1440, 8, 1440)
    start: np.ndarray
    reward_next: np.ndarray
    terminal: np.ndarray
    physician: np.ndarray  # (1440, 8) the soft logging policy
    occupancy: np.ndarray  # (1440,) expected visits of each live state in 20 steps under the physician
    obs720: np.ndarray  # (1440,) observation index of each full state


def exact_quantities(version: str) -> Exact:
    tx = S.transition_matrix(version)
    start = S.start_distribution("os")
    death, discharge = S.terminal_classes()
    terminal = death | discharge
    physician = S.physician_policy(version)
    p_pi = np.einsum("sa,sat->st", physician, tx)
    live = (~terminal).astype(np.float64)
    d, occupancy = start.copy(), np.zeros(S.N_STATES)
    for _ in range(S.HORIZON):  # the rows a replay holds: transitions from live states at t = 0..19
        occupancy += d * live
        d = (d * live) @ p_pi
    obs720, _ = S.obs_index_of("obs720")
    return Exact(tx, start, S.reward_next(), terminal, physician, occupancy, obs720)


def exact_value(policy: np.ndarray, ex: Exact) -> float:
    value, _ = mdp.np_policy_evaluation(policy, ex.tx, ex.start, ex.reward_next, ex.terminal, 1.0, S.HORIZON)
    return value


def through_obs720(obs_table: np.ndarray, ex: Exact) -> np.ndarray:
    """A (720, A) policy over observations as a (1440, A) policy over full states."""
    return obs_table[ex.obs720]


def marginal_physician(ex: Exact, view_index: np.ndarray, n_view: int) -> np.ndarray:
    """(n_view, A): the physician's policy averaged over the full states of each view state, weighted by
    the physician's own occupancy (the limit of a count estimate from its replays); uniform if unvisited."""
    mass = np.zeros((n_view, S.N_ACTIONS))
    np.add.at(mass, view_index, ex.occupancy[:, None] * ex.physician)
    total = mass.sum(1, keepdims=True)
    return np.where(total > 0, mass / np.maximum(total, 1e-300), 1.0 / S.N_ACTIONS)


def reference_targets(ex: Exact) -> dict[str, np.ndarray]:
    """Reference target policies over obs720, as (1440, 8) tables acting through the observation."""
    projected = marginal_physician(ex, ex.obs720, S.N_OBS_STATES)
    # the 20-step optimum's first-step Q on the full state, averaged over diabetes with the physician's
    # occupancy (QMDP): a good policy for the observation, not the best one (that is a POMDP problem)
    live = ~ex.terminal
    values = np.zeros(S.N_STATES)
    for _ in range(S.HORIZON - 1):
        values = np.where(live, (ex.tx @ (ex.reward_next + live * values)).max(1), 0.0)
    q_first = ex.tx @ (ex.reward_next + live * values)
    q_obs = np.zeros((S.N_OBS_STATES, S.N_ACTIONS))
    np.add.at(q_obs, ex.obs720, ex.occupancy[:, None] * q_first)
    eye = np.eye(S.N_ACTIONS)
    return {
        "physician soft, through obs720": through_obs720(projected, ex),
        "physician deterministic, through obs720": through_obs720(eye[projected.argmax(1)], ex),
        "QMDP optimum, through obs720": through_obs720(eye[q_obs.argmax(1)], ex),
        "uniform random": np.full((S.N_STATES, S.N_ACTIONS), 1.0 / S.N_ACTIONS),
    }


def checkpoint_targets(paths: tuple[Path, ...], version: str) -> dict[str, np.ndarray]:
    params = S.load_params(version, "obs720")
    meta = {"feature_names": S.feature_names("obs720"), "obs_dim": int(params.obs_dim)}
    out = {}
    for path in paths:
        policy = load_policy(path, feature_names=meta["feature_names"], obs_dim=meta["obs_dim"])
        out[f"{policy.config.get('algo', path.parent.parent.name)} {path.name}"] = np.asarray(
            policy.action_probs(params.state_vectors), np.float64
        )
    return out


def infinite_data_limits(soft: np.ndarray, ex: Exact) -> dict[str, float]:
    """What the obs720 estimators converge to with unlimited physician data (float64, exact): WIS and PDWIS
    with the marginal propensities pi_bar(a|o) (ratio of expectations, ended episodes carrying their
    weight), and tabular FQE on obs720 (the model that averages the full states of an observation with
    the physician's occupancy of each (state, action)). `soft` is the (1440, A) softened target."""
    live = ~ex.terminal
    pi_bar = marginal_physician(ex, ex.obs720, S.N_OBS_STATES)[ex.obs720]  # (1440, A)
    # importance sampling: the weighted state mass m_t(s) = E_b[w_{0:t-1} 1(s_t = s, alive)]
    tilted = ex.physician * soft / pi_bar  # pi_b(a|s) rho(a|o(s))
    p_tilted = np.einsum("sa,sat->st", tilted, ex.tx)
    mass, ended, wis_num, pdwis = ex.start.copy(), 0.0, 0.0, 0.0
    for _ in range(S.HORIZON):
        nxt = (mass * live) @ p_tilted
        reward_mass = float(nxt @ ex.reward_next)
        ended += float(nxt[ex.terminal].sum())
        mass = nxt * live
        total = ended + float(mass.sum())  # E_b[w_{0:t}], ended episodes carry their weight
        wis_num += reward_mass
        pdwis += reward_mass / total
    wis = wis_num / (ended + float(mass.sum()))
    # FQE on obs720: the data weight of (s, a) is occupancy(s) pi_b(a|s), pooled over the 20 steps
    weight = ex.occupancy[:, None] * ex.physician  # (1440, A)
    pair_weight = np.zeros((S.N_OBS_STATES, S.N_ACTIONS))
    np.add.at(pair_weight, ex.obs720, weight)
    target_obs = np.full((S.N_OBS_STATES, S.N_ACTIONS), 1.0 / S.N_ACTIONS)
    target_obs[ex.obs720] = soft
    v_obs = np.zeros(S.N_OBS_STATES)
    for _ in range(S.HORIZON):
        backed = ex.tx @ (ex.reward_next + live * v_obs[ex.obs720])  # (1440, A) per full state
        q_obs = np.zeros((S.N_OBS_STATES, S.N_ACTIONS))
        np.add.at(q_obs, ex.obs720, weight * backed)
        q_obs = q_obs / np.maximum(pair_weight, 1e-300)
        v_obs = (target_obs * q_obs).sum(1)
    fqe = float(ex.start @ v_obs[ex.obs720])
    return {"wis": wis, "pdwis": pdwis, "fqe": fqe, "sum_weights": ended + float(mass.sum())}


# ---------------------------------------------------------------------------------------------------------
# Estimators on one dataset
# ---------------------------------------------------------------------------------------------------------


def count_behaviour(view_state: np.ndarray, action: np.ndarray, n_view: int, alpha: float) -> np.ndarray:
    """(n_view, A) behaviour policy estimated from logged (state, action) counts with a pseudo-count."""
    counts = np.zeros((n_view, S.N_ACTIONS))
    np.add.at(counts, (view_state, action), 1.0)
    counts += alpha
    return counts / counts.sum(1, keepdims=True)


def finite_horizon_fqe(
    state: np.ndarray,
    action: np.ndarray,
    reward: np.ndarray,
    terminated: np.ndarray,
    next_state: np.ndarray,
    policy: np.ndarray,
    first_state: np.ndarray,
    horizon: int,
) -> tuple[float, np.ndarray]:
    """Tabular FQE with `horizon` iterations from zero: Q_k(s, a) = mean over the logged (s, a) of
    r + V_{k-1}(s') (terminated steps do not bootstrap), a pair never logged takes its state's mean
    target, a state never logged the overall mean (ope.tabular_fqe's fit). Returns (mean V_horizon over
    the episodes' first states, Q (horizon + 1, S, A) with Q[k] the value with k steps left)."""
    n_states, n_actions = policy.shape
    pair = state * n_actions + action
    pair_n = np.bincount(pair, minlength=n_states * n_actions).astype(np.float64)
    state_n = np.bincount(state, minlength=n_states).astype(np.float64)
    bootstrap = ~terminated
    values = np.zeros(n_states)
    qs = [np.zeros((n_states, n_actions))]
    for _ in range(horizon):
        target = reward + bootstrap * values[next_state]
        pair_mean = np.bincount(pair, target, n_states * n_actions) / np.maximum(pair_n, 1)
        state_mean = np.bincount(state, target, n_states) / np.maximum(state_n, 1)
        fallback = np.where(state_n > 0, state_mean, target.mean())
        q = np.where(pair_n > 0, pair_mean, np.repeat(fallback, n_actions)).reshape(n_states, n_actions)
        values = (policy * q).sum(1)
        qs.append(q)
    return float(values[first_state].mean()), np.stack(qs)


@eqx.filter_jit
def _stationary_fqe(model: ope.TabularModel) -> jax.Array:
    return ope.tabular_fqe(model, 1.0, jnp.ones(model.first_state.shape[0], jnp.float32), 20)[0]


@jax.jit
def _is_estimates(inputs: ope.ISInputs) -> dict[str, jax.Array]:
    ones = jnp.ones(inputs.reward.shape[0], jnp.float32)
    return {"wis": ope.wis(inputs, ones), "pdwis": ope.pdwis(inputs, ones), "wdr": ope.wdr(inputs, ones)}


def dataset_estimates(
    rollout: dict[str, np.ndarray],
    fit_rollout: dict[str, np.ndarray],
    targets: dict[str, np.ndarray],
    ex: Exact,
    args: Args,
) -> dict[str, dict[str, dict[str, float]]]:
    """{target: {view: {estimator: estimate}}} on one replay."""
    state, next_state = rollout["state_index"], rollout["next_state_index"]
    action, reward = rollout["action"].astype(np.int64), rollout["reward"].astype(np.float64)
    terminated = rollout["terminated"].astype(bool)
    layout = ope.episode_layout(rollout["episode"], rollout["t"])
    first = layout.first_rows
    episode_of_row = np.unique(rollout["episode"], return_inverse=True)[1]
    full_index = np.arange(S.N_STATES)
    view_index = {"full1440": full_index, "obs720": ex.obs720}
    behaviour = {
        "logged": rollout["behavior_prob"].astype(np.float64),
        "obs720": count_behaviour(ex.obs720[fit_rollout["state_index"]], fit_rollout["action"], 720, args.alpha)[
            ex.obs720[state], action
        ],
        "obs720-limit": marginal_physician(ex, ex.obs720, 720)[ex.obs720[state], action],
        "full1440": count_behaviour(fit_rollout["state_index"], fit_rollout["action"], S.N_STATES, args.alpha)[
            state, action
        ],
    }  # fmt: skip
    model_view = {"logged": "full1440", "obs720": "obs720", "obs720-limit": "obs720", "full1440": "full1440"}
    out: dict[str, dict[str, dict[str, float]]] = {}
    for name, table in targets.items():
        soft = np.asarray(ope.soften(table, args.epsilon), np.float64)
        fqe_by_view = {}
        for view, index in view_index.items():
            n_view = int(index.max()) + 1
            # the target as a table over the view's states (it acts through obs720, a function of both)
            view_policy = np.full((n_view, S.N_ACTIONS), 1.0 / S.N_ACTIONS)
            view_policy[index] = soft
            s, s_next = index[state], index[next_state]
            value, qs = finite_horizon_fqe(
                s, action, reward, terminated, s_next, view_policy, s[first], S.HORIZON
            )
            steps_left = S.HORIZON - rollout["t"]
            q_logged = qs[steps_left, s, action]
            v_state = (qs[steps_left, s] * view_policy[s]).sum(1)
            fqe_data = ope.FQEData(
                action=jnp.asarray(action, jnp.int32),
                reward=jnp.asarray(reward, jnp.float32),
                terminated=jnp.asarray(terminated),
                next_probs=jnp.asarray(view_policy[s_next], jnp.float32),
                episode=jnp.asarray(episode_of_row, jnp.int32),
                first_rows=jnp.asarray(first, jnp.int32),
                first_probs=jnp.asarray(view_policy[s[first]], jnp.float32),
            )  # fmt: skip
            stationary = float(_stationary_fqe(ope.make_tabular_model(fqe_data, s, s_next, n_view)))
            fqe_by_view[view] = (value, q_logged, v_state, stationary)
        out[name] = {}
        for view in VIEWS:
            value, q_logged, v_state, stationary = fqe_by_view[model_view[view]]
            inputs = ope.make_is_inputs(
                layout, reward, soft[state, action], behaviour[view], 1.0, q_logged=q_logged, v_state=v_state
            )  # no tail: with 0 steps left a truncated episode's remaining value is 0
            est = {k: float(v) for k, v in _is_estimates(inputs).items()}
            est.update(fqe=value, **{"fqe-inf": stationary}, ess=ope.weight_stats(inputs)["ess"])
            out[name][view] = est
    return out


# ---------------------------------------------------------------------------------------------------------
# Driver and table
# ---------------------------------------------------------------------------------------------------------


def learner_group(name: str) -> str:
    """Rows of one learner's seeds are pooled: 'cql s0_seed0' -> 'cql'."""
    return name.split(" ")[0] if name.split(" ")[-1].startswith("s") and "seed" in name else name


def summary(results: list[dict], exact: dict[str, float], limits: dict[str, dict], targets: dict) -> dict:
    """Per target group, view and estimator: mean error over datasets (seeds pooled within a dataset)
    and its standard error over datasets; and the infinite-data bias of the obs720 estimators."""
    groups: dict[str, list[str]] = {}
    for name in targets:
        groups.setdefault(learner_group(name), []).append(name)
    table = {}
    for group, names in groups.items():
        table[group] = {
            "exact": float(np.mean([exact[n] for n in names])),
            "n_policies": len(names),
            "views": {},
            "obs720_limit_bias": {
                e: float(np.mean([limits[n][e] - exact[n] for n in names])) for e in ("wis", "pdwis", "fqe")
            },
        }
        for view in VIEWS:
            row = {}
            for e in (*ESTIMATORS, "ess"):
                per_dataset = np.array(
                    [
                        np.mean([r[n][view][e] - (0.0 if e == "ess" else exact[n]) for n in names])
                        for r in results
                    ]
                )
                se = (
                    float(per_dataset.std(ddof=1) / np.sqrt(len(per_dataset)))
                    if len(per_dataset) > 1
                    else float("nan")
                )
                row[e] = {"mean": float(per_dataset.mean()), "se": se}
            table[group]["views"][view] = row
    return table


def markdown(table: dict, args: Args, seconds: float, observed: list[float]) -> str:
    """The table: bias per target and estimator in each view, and the obs720 estimators' exact limit."""
    head = (
        f"{args.datasets} datasets x {args.episodes:,} physician episodes (sim-{args.version}, seeds {args.seed}-"
        f"{args.seed + args.datasets - 1}); eps {args.epsilon}; bias = mean over datasets of estimate - exact "
        f"(+- its standard error over datasets); {seconds:.0f} s. Physician's observed return "
        f"{np.mean(observed):.4f} (exact 0.4334).\n"
    )
    lines = [
        head,
        "| target | exact | estimator | logged pi_b, full-state model | obs720: estimated pi_b, obs FQE "
        "(confounded) | obs720 limit (exact marginal pi_b) | full1440: estimated (diabetes visible) "
        "| obs720 bias with infinite data (exact) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for group, row in table.items():
        for e in ESTIMATORS:
            cells = []
            for view in VIEWS:
                m, se = row["views"][view][e]["mean"], row["views"][view][e]["se"]
                star = "**" if np.isfinite(se) and abs(m) > 3 * se and abs(m) > 0.01 else ""
                cells.append(f"{star}{m:+.4f}{star} ({se:.4f})")
            limit = row["obs720_limit_bias"].get(e)
            cells.append("" if limit is None else f"{limit:+.4f}")
            lines.append(f"| {group} | {row['exact']:.4f} | {e.upper()} | " + " | ".join(cells) + " |")
        ess = " | ".join(f"{row['views'][v]['ess']['mean']:.0f}" for v in VIEWS)
        lines.append(f"| {group} | | ESS | {ess} | |")
    return "\n".join(lines)


def main() -> None:
    args = tyro.cli(Args)
    start_time = time.perf_counter()
    ex = exact_quantities(args.version)
    targets = {**reference_targets(ex), **checkpoint_targets(args.checkpoints, args.version)}
    softened = {name: np.asarray(ope.soften(t, args.epsilon), np.float64) for name, t in targets.items()}
    exact = {name: exact_value(soft, ex) for name, soft in softened.items()}
    limits = {name: infinite_data_limits(soft, ex) for name, soft in softened.items()}
    print("| target | exact | obs720 bias with infinite data: WIS | PDWIS | FQE | E_b[w] |", file=sys.stderr)
    for name, lim in limits.items():
        print(f"| {name} | {exact[name]:.4f} | {lim['wis'] - exact[name]:+.4f} | {lim['pdwis'] - exact[name]:+.4f} "
              f"| {lim['fqe'] - exact[name]:+.4f} | {lim['sum_weights']:.3f} |", file=sys.stderr, flush=True)  # fmt: skip
    params = S.load_params(args.version, "obs720")
    policy = np.asarray(ex.physician, np.float32)
    results, observed = [], []
    for d in range(args.datasets):
        t0 = time.perf_counter()
        rollout = mdp.rollout_episodes(jax.random.key(args.seed + d), policy, params, args.episodes)
        fit = mdp.rollout_episodes(jax.random.key(args.seed + d + 100_000), policy, params, args.episodes)
        observed.append(float(rollout["reward"].sum()) / args.episodes)
        results.append(dataset_estimates(rollout, fit, targets, ex, args))
        print(
            f"dataset {d + 1}/{args.datasets}: {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True
        )
        # the table so far after every dataset, so that an interrupted run still reports what it measured
        done = Args(**{**asdict(args), "datasets": d + 1})
        text = markdown(
            summary(results, exact, limits, targets), done, time.perf_counter() - start_time, observed
        )
        if d + 1 < args.datasets:
            print(text, file=sys.stderr, flush=True)
        if args.json_out is not None:
            write_json(args.json_out, {"args": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(done).items()},
                                       "exact": exact, "limits": limits, "summary": summary(results, exact, limits, targets),
                                       "per_dataset": results, "observed_return": observed,
                                       "seconds": time.perf_counter() - start_time})  # fmt: skip
    print(text)


if __name__ == "__main__":
    main()
