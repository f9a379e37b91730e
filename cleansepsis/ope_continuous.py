"""Off-policy evaluation of continuous-dose policies: fitted Q evaluation, and importance sampling where
the target has a density.

A target policy is a `ContinuousTarget`: its dose in physical units (mg) at a batch of observations, by
its mean (`mean_dose`) and, for a stochastic policy, by sampling (`sample`) with its log density per unit
(`log_density`, mg^-1, the unit of the replay's `behavior_log_density`). Any function obs -> dose makes a
deterministic target (`deterministic_target`); the simulator's policies are adapted by
`simulator_target`; checkpoints come in through `cleansepsis.policy.load_policy` (see `evaluate`).

FQE (Le et al. 2019, as in `ope.neural_fqe` but with the dose as an input): Q(s, a) is an MLP on the
standardised observation and the dose (by default mapped to [-1, 1] by the replay's bounds; or the dose
and its logarithm, each standardised by the logged doses, see `Scaling`). Each of `n_iterations`
outer steps (a `lax.scan`) freezes Q_k and regresses Q onto r + gamma * (1 - terminated) * mean_j
Q_k(s', a'_j) with an inner `lax.scan` of Adam steps on random minibatches, where a'_1..a'_K are the
target's doses at s' (K = 1 for a deterministic target, its mean; K draws for a stochastic one, drawn once
before the fit). The estimate is the mean over episodes of mean_j Q(s_0, a_0j). Its interval carries the
fit's own uncertainty, as the discrete neural FQE's does: the fit is repeated `n_refits` times under one
`jax.vmap`, each on one resample of the EPISODES (squared errors weighted by how often the episode was
drawn) from a fresh initialisation and minibatch stream; the interval is estimate +- z * their sd.
By default (`history_lags` 7) Q also sees the episode's 7 previous (obs, dose) steps (`history_features`):
for an observation that is not a Markov state, FQE on it alone is biased for targets other than the
behaviour (docs/evaluation.md). `ContinuousFQEConfig(history_lags=0)` is the observation-only fit. The
history needs whole episodes with steps t = 0, 1, 2, ... (`ope.episode_layout` says which episode is not);
their rows may come in any order.

Importance sampling (WIS, per-decision WIS, WDR with FQE's Q as the model) reuses `cleansepsis.ope` with
rho_t = pi_e(a_t|s_t) / pi_b(a_t|s_t), a ratio of densities (both per mg). A deterministic target has no
density: its ratio is a Dirac delta over a density, zero at every logged dose almost surely, so IS is
undefined and reported as such (evaluate it by FQE, or evaluate a stochastic version of it). IS also needs
the logged `behavior_log_density`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cleansepsis import ope
from cleansepsis.ope import OPEError

# ----------------------------------------------------------------------------------------------
# Target policies

DoseFn = Callable[[jnp.ndarray], jnp.ndarray]  # (B, obs_dim) raw obs -> (B,) dose in physical units


@dataclass(frozen=True)
class ContinuousTarget:
    """A continuous-dose policy as batched functions of raw (un-normalised) observations.

    mean_dose: obs (B, d) -> (B,) the dose it gives when acting deterministically (the mean, or the mode
        for a policy that has no mean).
    sample: (key, obs (B, d)) -> (B,) doses drawn from the policy; None for a deterministic policy.
    log_density: (obs (B, d), dose (B,)) -> (B,) log density per unit of the dose; None if unknown.
    """

    name: str
    mean_dose: DoseFn
    sample: Callable[[jax.Array, jnp.ndarray], jnp.ndarray] | None = None
    log_density: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] | None = None

    @property
    def stochastic(self) -> bool:
        return self.sample is not None


def deterministic_target(name: str, dose_fn: DoseFn) -> ContinuousTarget:
    """Any function obs (B, d) -> dose (B,) as a deterministic target."""
    return ContinuousTarget(name=name, mean_dose=dose_fn)


def simulator_target(
    name: str,
    policy: Callable,
    log_density: Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray] | None = None,
    mean_dose: DoseFn | None = None,
) -> ContinuousTarget:
    """A `cleansepsis.vancomycin` policy(key, obs, state, params) -> (dose, log_density) that acts on obs
    alone (not the oracle, which reads the hidden state) as a target. With `log_density` (obs, dose) ->
    log density (per observation) the target is stochastic and `mean_dose` (default: one draw with a
    fixed key) is what it gives acting deterministically; without it the policy is taken as deterministic."""

    def draw(key: jax.Array, obs: jnp.ndarray) -> jnp.ndarray:
        keys = jax.random.split(key, obs.shape[0])
        return jax.vmap(lambda k, o: policy(k, o, None, None)[0])(keys, obs)

    if log_density is None:
        return ContinuousTarget(name=name, mean_dose=lambda obs: draw(jax.random.key(0), obs))
    return ContinuousTarget(
        name=name,
        mean_dose=mean_dose if mean_dose is not None else (lambda obs: draw(jax.random.key(0), obs)),
        sample=draw,
        log_density=jax.vmap(log_density),
    )


def _batched(fn: Callable[[jnp.ndarray], jnp.ndarray], obs: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """fn over rows of obs in chunks (a policy network on 10^5-10^6 rows stays memory-flat)."""
    parts = [np.asarray(fn(jnp.asarray(obs[i : i + chunk])), np.float64) for i in range(0, len(obs), chunk)]
    return np.concatenate(parts) if parts else np.zeros(0)


def _batched_pairs(fn: Callable, obs: np.ndarray, dose: np.ndarray, chunk: int = 65_536) -> np.ndarray:
    """fn(obs, dose) over matching rows in chunks."""
    parts = [np.asarray(fn(jnp.asarray(obs[i : i + chunk]), jnp.asarray(dose[i : i + chunk])), np.float64)
             for i in range(0, len(obs), chunk)]  # fmt: skip
    return np.concatenate(parts) if parts else np.zeros(0)


def target_doses(
    target: ContinuousTarget, obs: np.ndarray, key: jax.Array, n_samples: int, acting: str
) -> np.ndarray:
    """(N, K) doses of the target at obs: K = 1 (its mean dose) when acting "mean" or the target is
    deterministic, else `n_samples` draws."""
    if acting not in ("mean", "sample"):
        raise OPEError(f"acting must be 'mean' or 'sample'; got {acting!r}")
    if acting == "mean" or not target.stochastic:
        return _batched(target.mean_dose, obs)[:, None]
    if n_samples < 1:
        raise OPEError(f"n_action_samples must be at least 1, got {n_samples}")
    keys = jax.random.split(key, n_samples)
    return np.stack([_batched(lambda o, k=k: target.sample(k, o), obs) for k in keys], axis=1)


# ----------------------------------------------------------------------------------------------
# FQE

DOSE_ENCODINGS = ("bounds", "standardised")


@dataclass(frozen=True)
class ContinuousFQEConfig:
    """The continuous FQE fit. The defaults are the fit validated on the vancomycin simulator: Q on the
    observation plus the episode's 7 previous (obs, dose) steps (the whole history of its 8-step episodes),
    2 x 256, 12 iterations x 2,000 Adam steps of 512 (docs/evaluation.md, "History FQE at the current
    policies"). `history_lags=0` is the observation-only fit (faster; biased for policies other than the
    logged one where the observation is not a Markov state)."""

    hidden: int = 256
    n_iterations: int = 12  # outer FQE iterations (target refreshes); >= the horizon when gamma is 1
    steps_per_iteration: int = 2_000
    batch_size: int = 512
    learning_rate: float = 1e-3
    dose_encoding: str = "bounds"  # or "standardised" (see Scaling); "bounds" is the one validated
    final_lr_share: float = 0.02  # cosine decay of the rate within each iteration, to this share
    history_lags: int = 7  # Q also sees this many previous (obs, dose) steps of the episode (history_features)
    # rows whose logged dose lies near the target's dose at that state weigh 1 + target_focus * kernel in the
    # regression (a Gaussian kernel, bandwidth focus_bandwidth x the dose bounds' range); 0: every row alike
    target_focus: float = 0.0
    focus_bandwidth: float = 0.05
    dose_every_layer: bool = False  # the dose is an input of every layer of Q, not only of the first

    def __post_init__(self):
        for name in ("hidden", "n_iterations", "steps_per_iteration", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise OPEError(f"continuous FQE {name} must be a positive integer, got {value!r}")
        if not isinstance(self.history_lags, int) or isinstance(self.history_lags, bool) or self.history_lags < 0:
            raise OPEError(f"continuous FQE history_lags must be an integer >= 0 (0: Q on the observation only), "
                           f"got {self.history_lags!r}")  # fmt: skip
        if not (np.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise OPEError(f"continuous FQE learning_rate must be positive, got {self.learning_rate!r}")
        if not 0.0 <= self.final_lr_share <= 1.0:
            raise OPEError(f"continuous FQE final_lr_share must be in [0, 1], got {self.final_lr_share!r}")
        if not (np.isfinite(self.target_focus) and self.target_focus >= 0):
            raise OPEError(f"continuous FQE target_focus must be >= 0 (0: off), got {self.target_focus!r}")
        if not (np.isfinite(self.focus_bandwidth) and self.focus_bandwidth > 0):
            raise OPEError(f"continuous FQE focus_bandwidth must be positive, got {self.focus_bandwidth!r}")
        if self.dose_encoding not in DOSE_ENCODINGS:
            raise OPEError(f"dose_encoding must be one of {DOSE_ENCODINGS}; got {self.dose_encoding!r}")


def q_inputs(history_lags: int) -> str:
    """What FQE's Q sees, in words (outputs name it, so an estimate says which fit made it)."""
    if history_lags == 0:
        return "observation only (history_lags 0)"
    return f"observation + history: the episode's {history_lags} previous (obs, dose) steps (history_lags {history_lags})"


class ContinuousFQEData(eqx.Module):
    """Flat arrays FQE regresses on, every input already normalised."""

    obs: jnp.ndarray  # (N, d) standardised
    dose: jnp.ndarray  # (N, F) logged dose, encoded
    reward: jnp.ndarray  # (N,)
    not_done: jnp.ndarray  # (N,) 0 after a terminal step; truncated steps bootstrap
    next_obs: jnp.ndarray  # (N, d) standardised
    next_doses: jnp.ndarray  # (N, K, F) target doses at next_obs, encoded
    episode: jnp.ndarray  # (N,) int32 in 0..E-1, for per-episode bootstrap counts
    first_rows: jnp.ndarray  # (E,) int32, the t = 0 transition of each episode
    first_doses: jnp.ndarray  # (E, K, F) target doses at s_0, encoded
    focus: jnp.ndarray  # (N,) each row's regression weight (ContinuousFQEConfig.target_focus; else 1)


@dataclass(frozen=True)
class Scaling:
    """How raw observations and doses become network inputs (from the evaluated data and the replay's
    action bounds), kept so that Q can be queried at any raw (obs, dose).

    Dose encodings: "bounds" maps the dose to [-1, 1] by the action bounds (one feature); "standardised"
    gives two features, the dose and log(1 + dose) each standardised by the logged doses, so that the
    spread of the logged doses, where Q must resolve the action's effect, spans about one unit."""

    obs_mean: np.ndarray
    obs_std: np.ndarray
    low: float
    high: float
    dose_encoding: str
    dose_mean: float
    dose_std: float
    log_dose_mean: float
    log_dose_std: float

    @property
    def n_dose_features(self) -> int:
        return 1 if self.dose_encoding == "bounds" else 2

    def obs(self, obs: Any) -> np.ndarray:
        return ((np.asarray(obs, np.float64) - self.obs_mean) / self.obs_std).astype(np.float32)

    def dose(self, dose: Any) -> np.ndarray:
        """(...) raw doses -> (..., n_dose_features) network inputs."""
        clipped = np.clip(np.asarray(dose, np.float64), self.low, self.high)
        if self.dose_encoding == "bounds":
            return (2.0 * (clipped - self.low) / (self.high - self.low) - 1.0)[..., None].astype(np.float32)
        log_dose = np.log1p(clipped - self.low)
        return np.stack([(clipped - self.dose_mean) / self.dose_std,
                         (log_dose - self.log_dose_mean) / self.log_dose_std], -1).astype(np.float32)  # fmt: skip



def make_scaling(
    obs: np.ndarray, next_obs: np.ndarray, dose: np.ndarray, low: float, high: float, dose_encoding: str
) -> Scaling:
    if not (np.isfinite(low) and np.isfinite(high) and high > low):
        raise OPEError(f"action bounds must be finite with high > low; got [{low}, {high}]")
    if dose_encoding not in DOSE_ENCODINGS:
        raise OPEError(f"dose_encoding must be one of {DOSE_ENCODINGS}; got {dose_encoding!r}")
    both = np.concatenate([np.asarray(obs, np.float64), np.asarray(next_obs, np.float64)])
    std = both.std(0)
    logged = np.clip(np.asarray(dose, np.float64), low, high)
    log_dose = np.log1p(logged - low)

    def spread(x):
        return float(x.std()) if x.std() > 1e-6 else 1.0

    return Scaling(both.mean(0), np.where(std > 1e-6, std, 1.0), float(low), float(high), dose_encoding,
                   float(logged.mean()), spread(logged), float(log_dose.mean()), spread(log_dose))  # fmt: skip


def history_features(
    obs: np.ndarray, dose: np.ndarray, next_obs: np.ndarray, layout: ope.EpisodeLayout, lags: int
) -> tuple[np.ndarray, np.ndarray]:
    """(obs, next_obs) each with the episode's `lags` previous steps appended: for lag j = 1..lags the
    observation and dose j steps before, and a 1 saying that step exists (zeros before the episode's start).

    Why: an observation that summarises the history (the vancomycin simulator's keeps the last level and dose
    and the total dose, not each one) is not a Markov state. The Bellman backup at (o, a) then averages over
    the hidden states that the BEHAVIOUR's histories lead to, and a target that doses differently reaches
    the same o from other hidden states: FQE on o is biased for it however much data there is. Given the
    whole observed history the posterior of the hidden state no longer depends on the policy (the policies
    act on what is observed), so FQE on the history is consistent. The next state's history is the
    current step's shifted by one."""
    obs, next_obs = np.asarray(obs, np.float32), np.asarray(next_obs, np.float32)
    dose = np.asarray(dose, np.float32)
    if lags < 0:
        raise OPEError(f"history lags must be >= 0, got {lags}")
    if lags == 0:
        return obs, next_obs
    n, d = obs.shape
    rows, valid = layout.rows, layout.valid
    # each transition's own step record (obs, dose, present)
    step_record = np.concatenate([obs, dose[:, None], np.ones((n, 1), np.float32)], 1)
    width = d + 2
    episode_of_row = np.full(n, -1, np.int64)
    step_of_row = np.full(n, -1, np.int64)
    e_index, t_index = np.nonzero(valid)
    episode_of_row[rows[valid]] = e_index
    step_of_row[rows[valid]] = t_index

    def lagged(steps_back_from: np.ndarray) -> np.ndarray:
        """(n, lags * width): for lag j the record of step (steps_back_from - j), zeros where it is < 0."""
        out = np.zeros((n, lags * width), np.float32)
        for j in range(1, lags + 1):
            step = steps_back_from - j
            ok = step >= 0
            src = rows[episode_of_row[ok], step[ok]]
            out[ok, (j - 1) * width : j * width] = step_record[src]
        return out

    return (np.concatenate([obs, lagged(step_of_row)], 1),
            np.concatenate([next_obs, lagged(step_of_row + 1)], 1))  # fmt: skip


class DoseQNetwork(eqx.Module):
    layers: list
    dose_every_layer: bool = eqx.field(static=True)  # the dose enters every layer, not only the first

    def __init__(self, obs_dim: int, n_dose_features: int, hidden: int, key: jax.Array,
                 dose_every_layer: bool = False):  # fmt: skip
        k1, k2, k3 = jax.random.split(key, 3)
        extra = n_dose_features if dose_every_layer else 0
        self.layers = [
            eqx.nn.Linear(obs_dim + n_dose_features, hidden, key=k1),
            eqx.nn.Linear(hidden + extra, hidden, key=k2),
            eqx.nn.Linear(hidden + extra, "scalar", key=k3),
        ]
        self.dose_every_layer = dose_every_layer

    def __call__(self, obs: jnp.ndarray, dose: jnp.ndarray) -> jnp.ndarray:  # (d,), (F,) -> ()
        x = jnp.concatenate([obs, dose])
        for i, layer in enumerate(self.layers):
            if i and self.dose_every_layer:
                x = jnp.concatenate([x, dose])
            x = layer(x)
            if i < len(self.layers) - 1:
                x = jax.nn.relu(x)
        return x


def _q_many(network: DoseQNetwork, obs: jnp.ndarray, doses: jnp.ndarray) -> jnp.ndarray:
    """Q at (B, d) obs for each of (B, K, F) encoded doses -> (B, K)."""
    return jax.vmap(lambda o, ds: jax.vmap(lambda d: network(o, d))(ds))(obs, doses)


TARGET_CHUNK = 4_096  # rows per batch when the frozen Q's targets are computed for every transition


def bellman_targets(frozen: DoseQNetwork, data: ContinuousFQEData, gamma: float) -> jnp.ndarray:
    """(N,) r + gamma * (1 - terminated) * mean_j Q_frozen(s', a'_j) for every transition, in chunks of rows."""
    next_value = jax.lax.map(lambda row: jax.vmap(lambda d: frozen(row[0], d))(row[1]).mean(),
                             (data.next_obs, data.next_doses), batch_size=TARGET_CHUNK)  # fmt: skip
    return data.reward + gamma * data.not_done * next_value


def _init_network(data: ContinuousFQEData, key: jax.Array, config: ContinuousFQEConfig) -> tuple[DoseQNetwork, jax.Array]:
    """A fit's initial Q network and its (n_iterations,) keys, one per FQE iteration."""
    init_key, train_key = jax.random.split(key)
    network = DoseQNetwork(data.obs.shape[1], data.dose.shape[1], config.hidden, init_key, config.dose_every_layer)
    return network, jax.random.split(train_key, config.n_iterations)


def _fqe_iteration(
    network: DoseQNetwork, data: ContinuousFQEData, gamma: float, key: jax.Array, counts: jnp.ndarray,
    config: ContinuousFQEConfig,
) -> tuple[DoseQNetwork, jnp.ndarray]:
    """One FQE iteration: freeze Q_k, compute its Bellman target for every transition, regress Q on it
    (`steps_per_iteration` Adam steps, warm-started from Q_k). Returns (Q_k+1, the iteration's mean loss)."""
    params, static = eqx.partition(network, eqx.is_array)
    # each iteration is a regression of its own: Adam restarts, its rate decays to a small share, so the
    # fit ends near the minimiser instead of wherever the last noisy step left it (a bias in the mean);
    # the network itself carries over (a warm start from the previous iteration's Q)
    schedule = optax.cosine_decay_schedule(config.learning_rate, config.steps_per_iteration, config.final_lr_share)
    optimiser = optax.adam(schedule)
    n = data.obs.shape[0]
    row_weight = counts[data.episode] * data.focus  # (N,)
    targets = bellman_targets(network, data, gamma)  # (N,) from the frozen Q_k

    def loss_fn(p, idx, target):
        q = jax.vmap(eqx.combine(p, static))(data.obs[idx], data.dose[idx])  # (B,)
        w = row_weight[idx]
        return jnp.sum(w * (q - target) ** 2) / jnp.maximum(w.sum(), 1e-6)

    def inner(c, k):
        p, opt_state = c
        idx = jax.random.randint(k, (config.batch_size,), 0, n)
        loss, grads = jax.value_and_grad(loss_fn)(p, idx, targets[idx])
        updates, opt_state = optimiser.update(grads, opt_state, p)
        return (optax.apply_updates(p, updates), opt_state), loss

    keys = jax.random.split(key, config.steps_per_iteration)
    (params, _), losses = jax.lax.scan(inner, (params, optimiser.init(params)), keys)
    return eqx.combine(params, static), losses.mean()


def _fqe_value(network: DoseQNetwork, data: ContinuousFQEData, counts: jnp.ndarray) -> jnp.ndarray:
    """The estimate: the counts-weighted mean over episodes of mean_j Q(s_0, a_0j)."""
    v0 = _q_many(network, data.obs[data.first_rows], data.first_doses).mean(-1)  # (E,)
    return (counts * v0).sum() / counts.sum()


def continuous_fqe(
    data: ContinuousFQEData,
    gamma: float,
    key: jax.Array,
    config: ContinuousFQEConfig = ContinuousFQEConfig(),
    counts: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, DoseQNetwork, jnp.ndarray]:
    """One FQE fit as one pure function (jit or vmap it; `continuous_fqe_estimate` runs the same steps one
    compiled call per iteration, to show progress). `counts` (E,) weights each episode (a bootstrap
    resample; None: every episode once). Returns (value, network, mean loss per iteration).

    Each iteration computes the frozen Q's Bellman target once for every transition (N * K forward
    passes) and then regresses on minibatches of those rows: the targets are the same numbers a per-minibatch
    evaluation of the frozen Q gives, without recomputing them at every one of the iteration's steps."""
    network, keys = _init_network(data, key, config)
    params, static = eqx.partition(network, eqx.is_array)
    counts = jnp.ones(data.first_rows.shape[0], jnp.float32) if counts is None else counts

    def outer(p, k):
        network, loss = _fqe_iteration(eqx.combine(p, static), data, gamma, k, counts, config)
        return eqx.partition(network, eqx.is_array)[0], loss

    params, losses = jax.lax.scan(outer, params, keys)
    network = eqx.combine(params, static)
    return _fqe_value(network, data, counts), network, losses


# The estimate and its refits run as R fits under one vmap, in two compiled programs: one FQE iteration
# (called n_iterations times, so a long fit shows progress between calls and stops at the end of the
# iteration a Ctrl-C lands in, as the learners' chunks do; docs/learners.md), and the values. Each is
# compiled once per data shape and fit: every target with the same number of sampled doses shares them. The
# initial networks are drawn eagerly, one fit at a time (the random draws' small programs are cached across
# fits and shapes; a vmapped init was a program of its own that took longer to compile than to run).
@eqx.filter_jit
def _iterate_fits(networks, data, gamma, keys, counts, config):
    return eqx.filter_vmap(lambda net, k, c: _fqe_iteration(net, data, gamma, k, c, config))(networks, keys, counts)


@eqx.filter_jit
def _fit_values(networks, data, counts):
    return eqx.filter_vmap(lambda net, c: _fqe_value(net, data, c))(networks, counts)


def _continuous_fqe_fits(data, gamma, keys, counts, config, progress: str | None = None):
    """One fit per row of `counts` (episode weights), each from its own initialisation and minibatches,
    under one vmap: (values (R,), networks stacked along a leading axis, losses (R, n_iterations)). With
    `progress` (a label), a progress bar on stderr advances after each iteration."""
    from cleansepsis import interrupts
    from cleansepsis.sweep import progress_bar

    fits = [_init_network(data, k, config) for k in keys]
    # stacked on the host: stacking on the device compiles a program per leaf shape
    networks = jax.tree.map(lambda *x: jnp.asarray(np.stack([np.asarray(a) for a in x])), *[f[0] for f in fits])
    iteration_keys = jax.random.wrap_key_data(np.stack([np.asarray(jax.random.key_data(f[1])) for f in fits]))
    # one iteration reads neither the number of iterations nor the history length (the data carry it): fits
    # that differ only there share the iteration's compiled program
    iteration_config = replace(config, n_iterations=1, history_lags=0)
    losses = []
    with progress_bar(config.n_iterations, progress, unit="iteration", enabled=progress is not None) as bar:
        for i in range(config.n_iterations):
            with interrupts.stop_point():  # Ctrl-C comes back at the end of the iteration it lands in
                networks, loss = _iterate_fits(networks, data, gamma, iteration_keys[:, i], counts, iteration_config)
                loss = np.asarray(loss)
            losses.append(loss)
            bar.set_postfix_str(f"loss {float(loss[0]):.4g}", refresh=False)
            bar.update(1)
    return _fit_values(networks, data, counts), networks, np.stack(losses, 1)


def make_continuous_fqe_data(
    obs: np.ndarray,
    dose: np.ndarray,
    reward: np.ndarray,
    next_obs: np.ndarray,
    terminated: np.ndarray,
    layout: ope.EpisodeLayout,
    next_doses: np.ndarray,
    first_doses: np.ndarray,
    scaling: Scaling,
    focus: np.ndarray | None = None,
) -> ContinuousFQEData:
    n = len(reward)
    episode_of_row = np.zeros(n, np.int32)
    episode_of_row[layout.rows[layout.valid]] = np.repeat(np.arange(layout.n_episodes), layout.lengths)
    return ContinuousFQEData(
        obs=jnp.asarray(scaling.obs(obs)),
        dose=jnp.asarray(scaling.dose(dose)),
        reward=jnp.asarray(reward, jnp.float32),
        not_done=jnp.asarray(1.0 - np.asarray(terminated, np.float32)),
        next_obs=jnp.asarray(scaling.obs(next_obs)),
        next_doses=jnp.asarray(scaling.dose(next_doses)),
        episode=jnp.asarray(episode_of_row),
        first_rows=jnp.asarray(layout.first_rows, jnp.int32),
        first_doses=jnp.asarray(scaling.dose(first_doses)),
        focus=jnp.asarray(np.ones(n, np.float32) if focus is None else focus, jnp.float32),
    )


def fit_options_text(config: ContinuousFQEConfig) -> str:
    """The diagnostic options of the fit, when on (so that an estimate says which fit made it)."""
    on = [f"rows focused on the target's doses x{config.target_focus:g} (bandwidth {config.focus_bandwidth:g} "
          f"of the bounds)"] if config.target_focus > 0 else []  # fmt: skip
    on += ["the dose in every layer"] if config.dose_every_layer else []
    return "".join(f"; {text}" for text in on)


def _history_text(lags: int) -> str:
    return " only, no history" if lags == 0 else f" + the {lags} previous (obs, dose) steps"


def continuous_fqe_estimate(
    fqe_data: ContinuousFQEData,
    gamma: float,
    key: jax.Array,
    counts: jnp.ndarray,
    config: ContinuousFQEConfig = ContinuousFQEConfig(),
    n_refits: int = 5,
    level: float = 0.95,
    progress: str | None = None,
) -> tuple[dict[str, Any], list[DoseQNetwork]]:
    """FQE's estimate and its interval from `n_refits` refits on the first rows of `counts` (episode
    resamples), and every fit's network (the estimate's first, then the refits'). n_refits 0: the estimate
    alone; 0 or 1: no interval (NaN bounds), said in the result. The estimate (every episode once) and the
    refits are fitted together, under one vmap. `progress`: a label for a progress bar on stderr (None:
    none)."""
    if n_refits < 0:
        raise OPEError(f"n_refits must be >= 0, got {n_refits}")
    n_refits = min(n_refits, int(counts.shape[0]))
    keys = jnp.stack([key, *jax.random.split(jax.random.fold_in(key, 1), n_refits)]) if n_refits else key[None]
    all_counts = jnp.ones((1, counts.shape[1]), jnp.float32)
    if n_refits:
        all_counts = jnp.concatenate([all_counts, jnp.asarray(counts[:n_refits], jnp.float32)])
    values, stacked, losses = _continuous_fqe_fits(fqe_data, float(gamma), keys, all_counts, config, progress)
    values = np.asarray(values, np.float64)
    # sliced on the host (one copy of the stack): slicing on the device compiles a program per leaf shape
    on_host = jax.tree.map(lambda x: np.asarray(x) if eqx.is_array(x) else x, stacked)
    networks = [jax.tree.map(lambda x, i=i: jnp.asarray(x[i]) if isinstance(x, np.ndarray) else x, on_host)
                for i in range(len(values))]  # fmt: skip
    value = float(values[0])
    result: dict[str, Any] = {
        "estimate": value,
        "refit_estimates": values[1:].tolist(),
        "features": f"MLP on (standardised obs{_history_text(config.history_lags)}, dose encoded "
        f"{config.dose_encoding!r}) ({config.hidden}x2, relu){fit_options_text(config)}",
        "q_inputs": q_inputs(config.history_lags),
        "history_lags": config.history_lags,
        "hidden": config.hidden,
        "n_iterations": config.n_iterations,
        "steps_per_iteration": config.steps_per_iteration,
        "batch_size": config.batch_size,
        "final_loss": float(losses[0, -1]),
        "n_action_samples": int(fqe_data.next_doses.shape[1]),
    }
    if n_refits >= 2:
        spread = float(np.std(values[1:], ddof=1))
        z = float(jax.scipy.stats.norm.ppf((1 + level) / 2))
        result.update(
            ci_low=value - z * spread, ci_high=value + z * spread, boot_std=spread, n_refits=n_refits,
            interval=f"estimate +- {z:.2f} sd of {n_refits} refits on episode resamples (fresh init each)",
        )  # fmt: skip
    else:
        result.update(ci_low=float("nan"), ci_high=float("nan"), boot_std=float("nan"), n_refits=n_refits,
                      interval="none (fewer than 2 refits)")  # fmt: skip
    return result, networks


def q_values(network: DoseQNetwork, scaling: Scaling, obs: np.ndarray, doses: np.ndarray) -> np.ndarray:
    """Q at raw obs (N, d) for raw doses (N, K) -> (N, K), in chunks."""
    q = eqx.filter_jit(_q_many)
    o, d = scaling.obs(obs), scaling.dose(doses)
    parts = [np.asarray(q(network, jnp.asarray(o[i : i + 65_536]), jnp.asarray(d[i : i + 65_536])))
             for i in range(0, len(o), 65_536)]  # fmt: skip
    return np.concatenate(parts)


# ----------------------------------------------------------------------------------------------
# Everything for one target policy


def _undefined(reason: str) -> dict[str, Any]:
    nan = float("nan")
    return {"estimate": nan, "ci_low": nan, "ci_high": nan, "ci_basic": [nan, nan], "boot_std": nan,
            "undefined": reason}  # fmt: skip


def is_undefined_reason(
    target: ContinuousTarget, acting: str, behavior_log_density: np.ndarray | None
) -> str | None:
    """Why importance sampling cannot evaluate this target on this data, or None when it can."""
    if acting == "mean" or not target.stochastic:
        return (
            "the target is deterministic (acting by its mean dose): pi_e(a|s) is a point mass, so the ratio to "
            "the behaviour density is zero at every logged dose almost surely and importance sampling is undefined"
        )
    if target.log_density is None:
        return "the target's density is unknown: importance sampling needs pi_e(a|s)"
    if behavior_log_density is None:
        return "the replay has no behavior_log_density: importance sampling needs the logging policy's density"
    bad = ~np.isfinite(np.asarray(behavior_log_density, np.float64))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        return (
            f"behavior_log_density of transition {i} is {behavior_log_density[i]}: importance sampling needs the "
            "logging policy's density at every logged dose"
        )
    return None


class ContinuousFQEInputs(NamedTuple):
    """Everything one target's FQE is fitted from, as `continuous_off_policy_evaluation` makes it."""

    fqe_data: ContinuousFQEData
    scaling: Scaling
    layout: ope.EpisodeLayout
    counts: np.ndarray  # (n_boot, E) episode resamples: the refits use the first rows, IS all of them
    q_obs: np.ndarray  # Q's input at each logged state (obs, and the history when history_lags > 0), raw
    q_next_obs: np.ndarray
    next_doses: np.ndarray  # (N, K) the target's doses at each next state
    first_doses: np.ndarray  # (E, K) the target's doses at each episode's first state
    fqe_key: jax.Array  # the estimate's fit (its refits fold it)
    state_key: jax.Array  # the target's doses at the logged states (IS's model terms)
    state_doses: np.ndarray | None = None  # (N, K) those doses, when the fit already drew them (target_focus > 0)


def prepare_continuous_fqe(
    data: Any,
    target: ContinuousTarget,
    *,
    low: float,
    high: float,
    acting: str = "mean",
    n_action_samples: int = 4,
    n_boot: int = 200,
    key: jax.Array | None = None,
    config: ContinuousFQEConfig = ContinuousFQEConfig(),
) -> ContinuousFQEInputs:
    """The FQE problem of `target` on logged transitions: episode layout and resamples, the target's doses,
    Q's inputs and their scaling, all from one key (folded 0-4), so that a diagnostic refits exactly what
    `continuous_off_policy_evaluation` fits."""
    if acting not in ("mean", "sample"):
        raise OPEError(f"acting must be 'mean' or 'sample'; got {acting!r}")
    action = np.asarray(data.action)
    if not np.issubdtype(action.dtype, np.floating):
        raise OPEError(
            f"the logged actions are {action.dtype} (discrete action indices); continuous OPE needs doses: "
            "evaluate discrete policies with cleansepsis.ope.off_policy_evaluation"
        )
    key = jax.random.key(0) if key is None else key
    k_boot, k_fqe, k_next, k_first, k_state = (jax.random.fold_in(key, i) for i in range(5))
    obs, next_obs = np.asarray(data.obs), np.asarray(data.next_obs)
    layout = ope.episode_layout(data.episode_id, data.t)
    counts = ope.bootstrap_counts(k_boot, layout.n_episodes, n_boot)
    # the target acts on the observation; Q may also see the history (history_features)
    next_doses = target_doses(target, next_obs, k_next, n_action_samples, acting)
    first_doses = target_doses(target, obs[layout.first_rows], k_first, n_action_samples, acting)
    q_obs, q_next_obs = history_features(obs, action, next_obs, layout, config.history_lags)
    scaling = make_scaling(q_obs, q_next_obs, action, low, high, config.dose_encoding)
    focus = state_doses = None
    if config.target_focus > 0:
        state_doses = target_doses(target, obs, k_state, n_action_samples, acting)  # (N, K) at each logged state
        z = (action[:, None] - state_doses) / (config.focus_bandwidth * (high - low))
        focus = 1.0 + config.target_focus * np.exp(-0.5 * z**2).mean(1)
    fqe_data = make_continuous_fqe_data(q_obs, action, np.asarray(data.reward, np.float32), q_next_obs,
                                        np.asarray(data.terminated), layout, next_doses, first_doses, scaling,
                                        focus)  # fmt: skip
    return ContinuousFQEInputs(fqe_data, scaling, layout, counts, q_obs, q_next_obs, next_doses, first_doses,
                               k_fqe, k_state, state_doses)  # fmt: skip


def continuous_off_policy_evaluation(
    data: Any,
    target: ContinuousTarget,
    *,
    low: float,
    high: float,
    gamma: float,
    behavior_log_density: np.ndarray | None = None,
    acting: str = "mean",
    n_action_samples: int = 4,
    clip: float | None = None,
    n_boot: int = 200,
    key: jax.Array | None = None,
    config: ContinuousFQEConfig = ContinuousFQEConfig(),
    n_refits: int = 5,
    progress: str | None = None,
) -> dict[str, Any]:
    """Estimate the value of a continuous-dose target policy on logged transitions (`data`: a
    `replay.Transitions` whose `action` is the dose in physical units within [low, high]).

    acting: "mean" evaluates the policy acting by its mean dose (deterministic), "sample" the stochastic
    policy (FQE averages Q over `n_action_samples` draws at every next state; WIS, PDWIS and WDR need its
    log_density and the logged `behavior_log_density`). Every estimator sees the same episode resamples.
    The result's `warnings` list the small-data problems (`ope.small_data_warnings`), `observed_return` is
    the logged policy's mean return per episode, `undefined` says why IS was not computed (or None)."""
    fqe = prepare_continuous_fqe(data, target, low=low, high=high, acting=acting,
                                 n_action_samples=n_action_samples, n_boot=n_boot, key=key, config=config)  # fmt: skip
    layout, counts, scaling = fqe.layout, fqe.counts, fqe.scaling
    obs, action = np.asarray(data.obs), np.asarray(data.action)
    reward = np.asarray(data.reward, np.float32)
    fqe_result, networks = continuous_fqe_estimate(fqe.fqe_data, gamma, fqe.fqe_key, counts, config, n_refits,
                                                   progress=progress)  # fmt: skip
    network = networks[0]  # the estimate's fit: the model of WDR

    undefined = is_undefined_reason(target, acting, behavior_log_density)
    if undefined is None:
        state_doses = fqe.state_doses
        if state_doses is None:
            state_doses = target_doses(target, obs, fqe.state_key, n_action_samples, acting)
        log_target = _batched_pairs(target.log_density, obs, action)
        log_rho = np.asarray(log_target, np.float64) - np.asarray(behavior_log_density, np.float64)
        rho = np.exp(np.minimum(log_rho, 60.0))  # a ratio above e^60 is as dominant as infinity, and finite
        q_logged = q_values(network, scaling, fqe.q_obs, action[:, None])[:, 0]
        v_state = q_values(network, scaling, fqe.q_obs, state_doses).mean(1)
        v_next = q_values(network, scaling, fqe.q_next_obs, fqe.next_doses).mean(1)
        inputs = ope.make_is_inputs(
            layout, reward, rho, np.ones_like(rho), gamma, clip, q_logged=q_logged, v_state=v_state,
            v_next=v_next, truncated=np.asarray(data.truncated),
        )  # fmt: skip
        estimates = ope.is_estimates(inputs, counts)
        weights = ope.weight_stats(inputs)
        warnings = ope.small_data_warnings(weights)
    else:
        estimates = {name: _undefined(undefined) for name in ("wis", "pdwis", "wdr")}
        weights = None
        # no weights: only the held-out-size warning can fire
        neutral = {"n_episodes": layout.n_episodes, "ess": float(layout.n_episodes), "max_weight": 1.0,
                   "max_weight_share": 0.0}  # fmt: skip
        warnings = ope.small_data_warnings(neutral)
    estimates["fqe"] = fqe_result
    returns = layout.pad(reward) * gamma ** np.arange(layout.rows.shape[1])
    return {
        "estimators": estimates,
        "weights": weights,
        "warnings": warnings,
        "undefined": undefined,
        "observed_return": float(returns.sum(1).mean()),
        "acting": acting,
        "n_action_samples": int(fqe.next_doses.shape[1]),
        "clip": clip,
        "gamma": gamma,
        "n_boot": n_boot,
        "n_episodes": layout.n_episodes,
        "n_transitions": len(reward),
        "target_doses": fqe.first_doses[:, 0],  # (E,) the target's dose at each s_0; not JSON
        "state_doses": _batched(target.mean_dose, obs),  # (N,) its mean dose at each logged state; not JSON
    }
