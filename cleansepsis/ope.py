"""Off-policy evaluation in JAX: WIS, per-decision WIS, weighted doubly robust and fitted Q evaluation.

Every estimate comes with a 95% interval from a bootstrap over EPISODES (ICU stays), never transitions:
a resample is a vector of per-episode counts (how often each episode was drawn), and every estimator
is written as a function of those counts, so `jax.vmap` runs all resamples at once and an episode's
transitions always enter or leave a resample together.

Conventions (see docs/evaluation.md):
- rho_t = pi_e(a_t|s_t) / pi_b(a_t|s_t); w_{0:t} = prod_{k<=t} rho_k. After an episode ends its weight is
  carried forward with reward 0 (the usual padding of per-decision estimators, Thomas 2015).
- Clipping (optional) caps the cumulative weights w_{0:t} at `clip`; the report gives the largest weight
  before clipping, the share of episode weights clipped, and the effective sample size
  (sum w)^2 / sum w^2 of the final episode weights after clipping.
- The target policy is softened before importance sampling: pi_soft = (1 - eps) pi + eps * uniform over
  the admissible actions. Softening changes the policy being evaluated; the report states eps.
- Truncated episodes: IS estimators use the observed return; WDR and FQE bootstrap the value of the last
  next state, as the replay format intends for truncation.
- Intervals for small held-out sets (docs/evaluation.md): WDR's refits tabular FQE on every resample;
  tabular FQE also gives `ci_identified`, a partial-identification interval for the values of actions
  the data never logged, beside its fitting interval `ci_low`/`ci_high`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from cleansepsis.linalg import linear_solve
from cleansepsis.replay import Transitions

ESTIMATORS = ("wis", "pdwis", "wdr", "fqe")


class OPEError(ValueError):
    """Inputs that off-policy evaluation cannot use; the message says which and why."""


# ----------------------------------------------------------------------------------------------
# Episode layout: flat transitions -> padded (episodes, steps) arrays


@dataclass(frozen=True)
class EpisodeLayout:
    """Where each (episode, step) of a padded array comes from in the flat transitions."""

    rows: np.ndarray  # (E, T) int, index into the transitions, -1 for padding
    lengths: np.ndarray  # (E,) int
    first_rows: np.ndarray  # (E,) int, the t = 0 transition of each episode
    last_rows: np.ndarray  # (E,) int, the final transition of each episode

    @property
    def n_episodes(self) -> int:
        return int(self.rows.shape[0])

    @property
    def valid(self) -> np.ndarray:
        return self.rows >= 0

    def pad(self, values: np.ndarray | jnp.ndarray, fill: float = 0.0) -> np.ndarray:
        """(N, ...) per-transition values -> (E, T, ...) with `fill` in the padding."""
        values = np.asarray(values)
        out = values[np.maximum(self.rows, 0)]
        mask = self.valid.reshape(self.valid.shape + (1,) * (values.ndim - 1))
        return np.where(mask, out, np.asarray(fill, values.dtype))


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def episode_layout(episode_id: np.ndarray | jnp.ndarray, t: np.ndarray | jnp.ndarray) -> EpisodeLayout:
    """Group transitions into episodes ordered by step; raise OPEError if an episode has gaps in t."""
    episode_id, t = np.asarray(episode_id), np.asarray(t)
    if episode_id.size == 0:
        raise OPEError("no transitions to evaluate")
    ids, index = np.unique(episode_id, return_inverse=True)
    order = np.lexsort((t, index))
    lengths = np.bincount(index, minlength=ids.size)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    step = np.arange(order.size) - np.repeat(starts, lengths)
    sorted_t = t[order]
    if np.any(sorted_t != step):
        bad = int(np.flatnonzero(sorted_t != step)[0])
        raise OPEError(
            f"episode {ids[index[order[bad]]]} has steps {sorted(t[index == index[order[bad]]].tolist())[:10]}...; "
            "off-policy evaluation needs every episode's steps 0, 1, 2, ... without gaps or repeats"
        )
    # steps padded to a multiple of 32, so datasets of similar size share one compiled program
    rows = np.full((ids.size, _round_up(int(lengths.max()), 32)), -1, np.int64)
    rows[index[order], step] = order
    first = rows[:, 0]
    last = rows[np.arange(ids.size), lengths - 1]
    return EpisodeLayout(rows=rows, lengths=lengths, first_rows=first, last_rows=last)


# ----------------------------------------------------------------------------------------------
# Policies as probability tables over the logged states


def soften(probs: np.ndarray, epsilon: float, action_mask: np.ndarray | None = None) -> np.ndarray:
    """(1 - eps) * probs + eps * uniform over the admissible actions (all actions without a mask)."""
    if not 0.0 <= epsilon < 1.0:
        raise OPEError(f"softening epsilon must be in [0, 1); got {epsilon}")
    probs = np.asarray(probs, np.float32)
    mask = np.ones(probs.shape, bool) if action_mask is None else np.asarray(action_mask, bool)
    uniform = mask / np.maximum(mask.sum(-1, keepdims=True), 1)
    return (1.0 - epsilon) * probs + epsilon * uniform


def greedy_probs(q_values: jnp.ndarray, action_mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """One-hot of the argmax over admissible actions (lowest index wins ties)."""
    q = jnp.asarray(q_values, jnp.float32)
    if action_mask is not None:
        q = jnp.where(jnp.asarray(action_mask, bool), q, -jnp.inf)
    return jax.nn.one_hot(jnp.argmax(q, axis=-1), q.shape[-1], dtype=jnp.float32)


# ----------------------------------------------------------------------------------------------
# Importance-sampling estimators, each a function of per-episode bootstrap counts


class ISInputs(eqx.Module):
    """Padded per-episode arrays the importance-sampling estimators read. Padding: reward 0, rho 1."""

    reward: jnp.ndarray  # (E, T)
    rho: jnp.ndarray  # (E, T) per-step ratio pi_e / pi_b, 1 in padding
    valid: jnp.ndarray  # (E, T) bool
    q_logged: jnp.ndarray  # (E, T) model Q(s_t, a_t) for WDR, 0 in padding
    v_state: jnp.ndarray  # (E, T) model V(s_t) = sum_a pi_e(a|s_t) Q(s_t, a), 0 in padding
    v_tail: jnp.ndarray  # (E,) model V of the last next state for truncated episodes, else 0
    gamma: float = eqx.field(static=True)
    clip: float | None = eqx.field(static=True)


def make_is_inputs(
    layout: EpisodeLayout,
    reward: np.ndarray,
    target_prob_logged: np.ndarray,
    behavior_prob: np.ndarray,
    gamma: float,
    clip: float | None = None,
    q_logged: np.ndarray | None = None,
    v_state: np.ndarray | None = None,
    v_next: np.ndarray | None = None,
    truncated: np.ndarray | None = None,
) -> ISInputs:
    """Build ISInputs from flat per-transition arrays (the model arrays are only needed for WDR)."""
    behavior_prob = np.asarray(behavior_prob, np.float64)
    if not np.all(np.isfinite(behavior_prob)) or np.any(behavior_prob <= 0):
        bad = int(np.flatnonzero(~(np.isfinite(behavior_prob) & (behavior_prob > 0)))[0])
        raise OPEError(
            f"behaviour probability of transition {bad} is {behavior_prob[bad]}; it must be > 0 "
            "(is the behaviour model missing, or does it give the logged action zero probability?)"
        )
    if clip is not None and clip <= 0:
        raise OPEError(f"weight clip must be positive; got {clip}")
    rho = np.asarray(target_prob_logged, np.float64) / behavior_prob
    n = rho.shape[0]
    zeros = np.zeros(n, np.float32)
    q_logged = zeros if q_logged is None else q_logged
    v_state = zeros if v_state is None else v_state
    tail = np.zeros(layout.n_episodes, np.float32)
    if v_next is not None and truncated is not None:
        last = layout.last_rows
        tail = np.where(np.asarray(truncated)[last], np.asarray(v_next)[last], 0.0)
    return ISInputs(
        reward=jnp.asarray(layout.pad(np.asarray(reward, np.float32)), jnp.float32),
        rho=jnp.asarray(layout.pad(rho.astype(np.float32), 1.0), jnp.float32),
        valid=jnp.asarray(layout.valid),
        q_logged=jnp.asarray(layout.pad(np.asarray(q_logged, np.float32)), jnp.float32),
        v_state=jnp.asarray(layout.pad(np.asarray(v_state, np.float32)), jnp.float32),
        v_tail=jnp.asarray(tail, jnp.float32),
        gamma=float(gamma),
        clip=None if clip is None else float(clip),
    )


def _cumulative_weights(inputs: ISInputs) -> jnp.ndarray:
    """w_{0:t} (E, T), clipped, then divided by the largest weight at each step: every estimator here
    normalises per step, so the scale cancels, and products of long episodes cannot overflow float32."""
    log_w = jnp.cumsum(jnp.log(inputs.rho), axis=1)  # padding has rho 1: carries the final weight
    if inputs.clip is not None:
        log_w = jnp.minimum(log_w, jnp.log(inputs.clip))
    top = log_w.max(axis=0, keepdims=True)
    return jnp.exp(log_w - jnp.where(jnp.isfinite(top), top, 0.0))


def _discounts(inputs: ISInputs) -> jnp.ndarray:
    return inputs.gamma ** jnp.arange(inputs.reward.shape[1], dtype=jnp.float32)  # (T,)


def wis(inputs: ISInputs, counts: jnp.ndarray) -> jnp.ndarray:
    """Weighted importance sampling; NaN when every episode has weight zero."""
    w_final = _cumulative_weights(inputs)[:, -1] * counts  # (E,)
    returns = (inputs.reward * _discounts(inputs)).sum(axis=1)  # (E,)
    total = w_final.sum()
    return jnp.where(total > 0, (w_final * returns).sum() / jnp.where(total > 0, total, 1.0), jnp.nan)


def _normalised_weights(inputs: ISInputs, counts: jnp.ndarray) -> jnp.ndarray:
    w = _cumulative_weights(inputs) * counts[:, None]  # (E, T)
    total = w.sum(axis=0, keepdims=True)  # (1, T)
    return jnp.where(total > 0, w / jnp.where(total > 0, total, 1.0), 0.0)


def pdwis(inputs: ISInputs, counts: jnp.ndarray) -> jnp.ndarray:
    """Per-decision WIS: step t is normalised by the summed weights w_{0:t}; NaN if all w_0 are zero."""
    w_hat = _normalised_weights(inputs, counts)
    value = (_discounts(inputs) * (w_hat * inputs.reward).sum(axis=0)).sum()
    return jnp.where(w_hat[:, 0].sum() > 0, value, jnp.nan)


def wdr(inputs: ISInputs, counts: jnp.ndarray) -> jnp.ndarray:
    """Weighted doubly robust (Thomas & Brunskill 2016) with a model Q, V (from FQE)."""
    w_hat = _normalised_weights(inputs, counts)  # (E, T)
    w_prev = jnp.concatenate([(counts / counts.sum())[:, None], w_hat[:, :-1]], axis=1)
    per_step = w_hat * (inputs.reward - inputs.q_logged) + w_prev * inputs.v_state  # (E, T)
    value = (_discounts(inputs) * per_step.sum(axis=0)).sum()
    lengths = inputs.valid.sum(axis=1)
    tail = (inputs.gamma**lengths) * w_hat[:, -1] * inputs.v_tail
    return jnp.where(w_hat[:, 0].sum() > 0, value + tail.sum(), jnp.nan)


def weight_stats(inputs: ISInputs) -> dict[str, float]:
    """Largest weight before clipping, share of episode weights clipped, ESS after clipping."""
    raw = np.prod(np.asarray(inputs.rho, np.float64), axis=1)  # float64: long products stay finite longer
    used = raw if inputs.clip is None else np.minimum(raw, inputs.clip)
    scaled = used / used.max() if np.isfinite(used.max()) and used.max() > 0 else np.isinf(used).astype(float)
    total_sq = float((scaled**2).sum())
    return {
        "max_weight": float(raw.max()),
        "max_weight_share": float(scaled.max() / scaled.sum()) if scaled.sum() > 0 else float("nan"),
        "share_clipped": 0.0 if inputs.clip is None else float((raw > inputs.clip).mean()),
        "ess": float(scaled.sum() ** 2 / total_sq) if total_sq > 0 else 0.0,
        "share_zero_weight": float((raw == 0).mean()),
        "n_episodes": len(raw),
    }


# ----------------------------------------------------------------------------------------------
# Small-data warnings

# Thresholds of the warnings (stated in every report, docs/evaluation.md):
SMALL_HELD_OUT_EPISODES = 100  # fewer held-out episodes: percentile bootstrap intervals are unreliable
MIN_ESS_SHARE = 0.10  # ESS below this share of the episodes: the IS estimates rest on a few episodes
# or below this many effective episodes, whatever the share: on ICU-Sepsis the 95% intervals of WIS and
# of WDR with FQE's Q held fixed covered the exact value in only 74-88% of datasets with ESS 23-82
# (docs/evaluation.md)
MIN_ESS = 50
MAX_WEIGHT_SHARE = 0.25  # the largest episode weight above this share of the total: one stay dominates
MAX_BEHAVIOR_ECE = 0.10  # behaviour model's expected calibration error on the evaluated data above this


def warning_thresholds() -> dict[str, float]:
    return {
        "small_held_out_episodes": SMALL_HELD_OUT_EPISODES,
        "min_ess_share": MIN_ESS_SHARE,
        "min_ess": MIN_ESS,
        "max_weight_share": MAX_WEIGHT_SHARE,
        "max_behavior_ece": MAX_BEHAVIOR_ECE,
    }


def small_data_warnings(weights: dict[str, Any], behavior_ece: float | None = None) -> list[dict[str, str]]:
    """Warnings ({code, message}) about a target's estimates from `weight_stats` and the behaviour
    model's ECE on the evaluated data (None: unknown, no warning)."""
    n = weights["n_episodes"]
    out = []
    if n < SMALL_HELD_OUT_EPISODES:
        out.append({"code": "small-held-out-set", "message": (
            f"only {n} held-out episodes (< {SMALL_HELD_OUT_EPISODES}): every interval is unreliable; the "
            "bootstrap cannot show what it has not seen")})  # fmt: skip
    if not (weights["ess"] >= MIN_ESS_SHARE * n and weights["ess"] >= MIN_ESS):
        out.append({"code": "low-ess", "message": (
            f"effective sample size {weights['ess']:.1f} of {n} episodes (< {100 * MIN_ESS_SHARE:.0f}% or < "
            f"{MIN_ESS}): WIS, PDWIS and WDR rest on a few episodes")})  # fmt: skip
    if not weights["max_weight_share"] <= MAX_WEIGHT_SHARE:
        out.append({"code": "dominant-weight", "message": (
            f"the largest episode weight ({weights['max_weight']:.3g}) is {100 * weights['max_weight_share']:.0f}% "
            f"of the total (> {100 * MAX_WEIGHT_SHARE:.0f}%): the IS estimates are about one stay")})  # fmt: skip
    if behavior_ece is not None and behavior_ece > MAX_BEHAVIOR_ECE:
        out.append({"code": "behavior-miscalibrated", "message": (
            f"the behaviour model's expected calibration error on the evaluated data is {behavior_ece:.3f} "
            f"(> {MAX_BEHAVIOR_ECE}): importance weights built on it are unreliable")})  # fmt: skip
    return out


# ----------------------------------------------------------------------------------------------
# Bootstrap over episodes


@jax.jit(static_argnames=("n_episodes", "n_resamples"))
def bootstrap_counts(key: jax.Array, n_episodes: int, n_resamples: int) -> jnp.ndarray:
    """(n_resamples, n_episodes) float counts: each resample draws n_episodes episodes with replacement."""
    draws = jax.random.randint(key, (n_resamples, n_episodes), 0, n_episodes)
    return jax.vmap(lambda d: jnp.bincount(d, length=n_episodes))(draws).astype(jnp.float32)


def basic_interval(estimate: float, samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """The basic (reverse-percentile) bootstrap interval [2 est - q_hi, 2 est - q_lo]: it moves against
    the resamples' own bias (e.g. tabular FQE's pull towards the behaviour where pairs go unseen)."""
    lo, hi = interval(samples, level)
    return (2 * estimate - hi, 2 * estimate - lo)


def interval(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap samples, ignoring NaN resamples (all weights zero)."""
    samples = np.asarray(samples, np.float64)
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return (float("nan"), float("nan"))
    lo, hi = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return (float(lo), float(hi))


_IS_FUNCTIONS = {"wis": wis, "pdwis": pdwis, "wdr": wdr}


def _value_and_variance(
    fn, inputs: ISInputs, counts: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """The estimate at `counts`, its delta-method variance and the episodes' empirical influence values.

    Every estimator here is homogeneous of degree 0 in the counts (a ratio of count-weighted sums), so
    with p = counts / n the influence of episode i is L_i = d estimate / d p_i = n * d estimate / d
    counts_i (exact, by autodiff), sum_i counts_i L_i = 0, and the nonparametric delta-method variance is
    sum_i counts_i L_i^2 / n^2 (the nonparametric delta method; Efron & Tibshirani 1993)."""
    value, grad = jax.value_and_grad(lambda c: fn(inputs, c))(counts)
    n = counts.sum()
    influence = n * grad
    return value, (counts * influence**2).sum() / n**2, influence


@eqx.filter_jit
def _bootstrap_is(inputs: ISInputs, counts: jnp.ndarray) -> dict[str, jnp.ndarray]:
    # the point estimate is the resample with every count 1, so each estimator is traced once
    all_counts = jnp.concatenate([jnp.ones((1, counts.shape[1]), jnp.float32), counts])
    out = {}
    for name, fn in _IS_FUNCTIONS.items():
        # 8 resamples at a time: each holds (E, T) weights and their gradients (all 51 at once took
        # 1.7 GB on 10,000 episodes)
        values, variances, influence = jax.lax.map(
            lambda c, fn=fn: _value_and_variance(fn, inputs, c), all_counts, batch_size=8
        )
        out[name], out[name + "_boot"] = values[0], values[1:]
        out[name + "_var"], out[name + "_boot_var"] = variances[0], variances[1:]
        out[name + "_influence"] = influence[0]
    return out


# quantiles already computed, by the probabilities' shape and values: the few levels used are computed
# once per process (each eager call compiled about 20 small programs again after every jax.clear_caches()).
# The key holds the shape, so every result is the one a call of that shape computes.
_NORMAL_QUANTILES: dict[tuple[tuple[int, ...], bytes], np.ndarray] = {}


def _normal_quantile(p: float | np.ndarray) -> np.ndarray:
    p32 = np.asarray(p, np.float32)
    key = (p32.shape, p32.tobytes())
    if key not in _NORMAL_QUANTILES:
        _NORMAL_QUANTILES[key] = np.asarray(jax.scipy.stats.norm.ppf(jnp.asarray(p, jnp.float32)), np.float64)
    return _NORMAL_QUANTILES[key].copy()


def normal_interval(estimate: float, se: float, level: float = 0.95) -> tuple[float, float]:
    """estimate +- z * se, se from the delta method (the influence values)."""
    z = float(_normal_quantile((1 + level) / 2))
    return (estimate - z * se, estimate + z * se)


def bootstrap_t_interval(
    estimate: float, se: float, samples: np.ndarray, sample_se: np.ndarray, level: float = 0.95
) -> tuple[float, float]:
    """Studentized (bootstrap-t) interval [est - t_hi se, est - t_lo se], t the quantiles of
    (sample - est) / sample_se over the resamples, each resample's se by the delta method on that
    resample (Hall 1988, Ann. Statist. 16(3); Efron & Tibshirani 1993): it follows the skew of a ratio
    estimator whose spread grows with its value, which the percentile interval does not."""
    samples, sample_se = np.asarray(samples, np.float64), np.asarray(sample_se, np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (samples - estimate) / sample_se
    t = t[~np.isnan(t)]  # +-inf (a resample with zero spread) stays: it makes the interval unbounded
    if t.size == 0 or not np.isfinite(se):
        return (float("nan"), float("nan"))
    t_lo, t_hi = np.quantile(t, [(1 - level) / 2, (1 + level) / 2], method="inverted_cdf")
    with np.errstate(invalid="ignore"):  # an infinite t times se 0 (every weight zero): NaN, no interval
        return (float(estimate - t_hi * se), float(estimate - t_lo * se))


def bca_interval(
    estimate: float, samples: np.ndarray, influence: np.ndarray, level: float = 0.95
) -> tuple[float, float]:
    """Bias-corrected and accelerated percentile interval (Efron 1987, JASA 82(397)): z0 from the share of
    resamples below the estimate, the acceleration a = sum L^3 / (6 (sum L^2)^1.5) from the influence values L
    (what the jackknife approximates). Percentiles at Phi(z0 + (z0 + z) / (1 - a (z0 + z)))."""
    samples = np.asarray(samples, np.float64)
    samples = samples[np.isfinite(samples)]
    influence = np.asarray(influence, np.float64)
    if samples.size == 0:
        return (float("nan"), float("nan"))
    below = np.clip(np.mean(samples < estimate), 1 / (samples.size + 1), samples.size / (samples.size + 1))
    z0 = float(_normal_quantile(below))
    sum_sq = float((influence**2).sum())
    accel = float((influence**3).sum()) / (6 * sum_sq**1.5) if sum_sq > 0 else 0.0
    z = _normal_quantile(np.array([(1 - level) / 2, (1 + level) / 2]))
    shares = jax.scipy.stats.norm.cdf(jnp.asarray(z0 + (z0 + z) / (1 - accel * (z0 + z)), jnp.float32))
    lo, hi = np.quantile(samples, np.clip(np.asarray(shares, np.float64), 0.0, 1.0))
    return (float(lo), float(hi))


def is_estimates(inputs: ISInputs, counts: jnp.ndarray, level: float = 0.95) -> dict[str, dict[str, Any]]:
    """WIS, PDWIS and WDR point estimates with bootstrap intervals over the given episode counts:
    `ci_low`/`ci_high` the percentile interval, `ci_basic`, and three intervals for heavy-tailed
    weights built on the delta-method standard error `se` (`normal_interval`, `bootstrap_t_interval`,
    `bca_interval`); docs/evaluation.md measures their coverage."""
    raw = _bootstrap_is(inputs, counts)
    result = {}
    for name in _IS_FUNCTIONS:
        boot = np.asarray(raw[name + "_boot"])
        boot_se = np.sqrt(np.maximum(np.asarray(raw[name + "_boot_var"], np.float64), 0.0))
        estimate = float(raw[name])
        se = float(np.sqrt(max(float(raw[name + "_var"]), 0.0)))
        lo, hi = interval(boot, level)
        result[name] = {
            "estimate": estimate,
            "ci_low": lo,
            "ci_high": hi,
            "ci_basic": list(basic_interval(estimate, boot, level)),
            "se": se,
            "ci_normal": list(normal_interval(estimate, se, level)),
            "ci_bootstrap_t": list(bootstrap_t_interval(estimate, se, boot, boot_se, level)),
            "ci_bca": list(bca_interval(estimate, boot, np.asarray(raw[name + "_influence"]), level)),
            "boot_std": float(np.nanstd(boot)) if np.isfinite(boot).any() else float("nan"),
            "n_boot_nan": int((~np.isfinite(boot)).sum()),
        }
    return result


class RefitModelInputs(eqx.Module):
    """Where WDR reads its model: per transition the state, logged action and softened target there, the
    padded (episode, step) -> transition index, and for truncated episodes the last next state and the
    target there (tabular Q only). Per transition, not padded: a padded (E, T, A) table of Q values per
    resample took 0.5 GB on 10,000 episodes."""

    rows: jnp.ndarray  # (E, T) int32 transition index, 0 in padding (masked by ISInputs.valid)
    state: jnp.ndarray  # (N,) int32
    action: jnp.ndarray  # (N,) int32
    target: jnp.ndarray  # (N, A) softened target at s
    tail_state: jnp.ndarray  # (E,) int32 last next state
    tail_target: jnp.ndarray  # (E, A) softened target there, 0 unless the episode was truncated


def make_refit_model_inputs(
    layout: EpisodeLayout,
    state_index: np.ndarray,
    action: np.ndarray,
    target: np.ndarray,
    next_state_index: np.ndarray,
    next_target: np.ndarray,
    truncated: np.ndarray,
    n_states: int,
) -> RefitModelInputs:
    last = layout.last_rows
    tail_on = np.asarray(truncated, bool)[last]
    return RefitModelInputs(
        rows=jnp.asarray(np.maximum(layout.rows, 0), jnp.int32),
        state=jnp.asarray(np.asarray(state_index, np.int32)),
        action=jnp.asarray(np.asarray(action, np.int32)),
        target=jnp.asarray(np.asarray(target, np.float32)),
        tail_state=jnp.asarray(np.clip(np.asarray(next_state_index)[last], 0, n_states - 1), jnp.int32),
        tail_target=jnp.asarray(np.where(tail_on[:, None], np.asarray(next_target, np.float32)[last], 0.0)),
    )


@eqx.filter_jit
def wdr_refit_bootstrap(
    inputs: ISInputs, model: RefitModelInputs, counts: jnp.ndarray, boot_q: jnp.ndarray
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """WDR on every resample with that resample's own FQE Q (B, S, A): the bootstrap then replicates the
    whole doubly robust procedure, model fit included, as the bootstrap principle asks. Returns the
    (B,) estimates and their (B,) delta-method variances (the model held fixed within a resample)."""

    def one(c: jnp.ndarray, q: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
        q_at = q[model.state]  # (N, A)
        q_logged = jnp.take_along_axis(q_at, model.action[:, None], -1)[:, 0]
        v_state = (model.target * q_at).sum(-1)
        refit = eqx.tree_at(
            lambda x: (x.q_logged, x.v_state, x.v_tail),
            inputs,
            (
                jnp.where(inputs.valid, q_logged[model.rows], 0.0),
                jnp.where(inputs.valid, v_state[model.rows], 0.0),
                (model.tail_target * q[model.tail_state]).sum(-1),
            ),
        )
        value, variance, _ = _value_and_variance(wdr, refit, c)
        return value, variance

    # 4 resamples at a time
    return jax.lax.map(lambda cq: one(*cq), (counts, boot_q), batch_size=4)


# ----------------------------------------------------------------------------------------------
# Fitted Q evaluation


class FQEData(eqx.Module):
    """Flat arrays FQE regresses on; probabilities are the target policy's (not softened)."""

    action: jnp.ndarray  # (N,) int32
    reward: jnp.ndarray  # (N,)
    terminated: jnp.ndarray  # (N,) bool: no bootstrap after a terminal state; truncated steps bootstrap
    next_probs: jnp.ndarray  # (N, A) target pi_e(.|s'_n)
    episode: jnp.ndarray  # (N,) int32 in 0..E-1, for per-episode bootstrap counts
    first_rows: jnp.ndarray  # (E,) int32, the t = 0 transition of each episode
    first_probs: jnp.ndarray  # (E, A) target pi_e(.|s_0)


def make_fqe_data(
    data: Transitions, layout: EpisodeLayout, target_probs: np.ndarray, next_target_probs: np.ndarray
) -> FQEData:
    episode_of_row = np.zeros(data.size, np.int32)
    episode_of_row[layout.rows[layout.valid]] = np.repeat(np.arange(layout.n_episodes), layout.lengths)
    return FQEData(
        action=jnp.asarray(data.action, jnp.int32),
        reward=jnp.asarray(data.reward, jnp.float32),
        terminated=jnp.asarray(data.terminated, bool),
        next_probs=jnp.asarray(next_target_probs, jnp.float32),
        episode=jnp.asarray(episode_of_row),
        first_rows=jnp.asarray(layout.first_rows, jnp.int32),
        first_probs=jnp.asarray(np.asarray(target_probs)[layout.first_rows], jnp.float32),
    )


class TabularModel(eqx.Module):
    """Logged transitions collapsed to their distinct (s, a, s', terminated, r) tuples, so that an
    iteration costs O(distinct tuples) rather than O(transitions), and the target policy as a table."""

    tuple_of_row: jnp.ndarray  # (N',) int32 index of each transition's tuple (N' >= N: padded rows)
    row_valid: jnp.ndarray  # (N',) float32, 0 for padding
    pair: jnp.ndarray  # (U,) int32 s * A + a
    state: jnp.ndarray  # (U,) int32
    next_state: jnp.ndarray  # (U,) int32
    not_done: jnp.ndarray  # (U,) float32
    reward: jnp.ndarray  # (U,) float32
    policy: jnp.ndarray  # (S, A) target policy per state
    episode: jnp.ndarray  # (N',) int32
    first_state: jnp.ndarray  # (E,) int32
    first_probs: jnp.ndarray  # (E, A)
    n_states: int = eqx.field(static=True)
    n_actions: int = eqx.field(static=True)


def make_tabular_model(fqe: FQEData, state_index: np.ndarray, next_state_index: np.ndarray, n_states: int) -> TabularModel:
    state = np.asarray(state_index, np.int64)
    if state.min() < 0 or state.max() >= n_states:
        raise OPEError(f"state_index outside 0..{n_states - 1}: tabular FQE needs a replay with state indices")
    next_state = np.clip(np.asarray(next_state_index, np.int64), 0, n_states - 1)
    next_probs = np.asarray(fqe.next_probs, np.float32)
    n_actions = next_probs.shape[1]
    policy = np.full((n_states, n_actions), 1.0 / n_actions, np.float32)
    policy[next_state] = next_probs
    first_state = state[np.asarray(fqe.first_rows)]
    policy[first_state] = np.asarray(fqe.first_probs)
    done = np.asarray(fqe.terminated)
    live = ~done
    if live.any() and np.abs(policy[next_state[live]] - next_probs[live]).max() > 1e-4:
        raise OPEError(
            "tabular FQE needs a target policy that is a function of state_index; the given policy gives "
            "different probabilities to transitions with the same next state (use --fqe neural)"
        )
    reward = np.asarray(fqe.reward, np.float32)
    action = np.asarray(fqe.action, np.int64)
    keys = np.stack([state, action, next_state, done.astype(np.int64), reward.view(np.int32).astype(np.int64)], 1)
    unique, tuple_of_row = np.unique(keys, axis=0, return_inverse=True)
    # rows and tuples padded to round sizes (padding has zero weight), so that datasets of similar size
    # share one compiled program
    n, n_pad = len(state), _round_up(len(state), 16_384)
    n_unique = len(unique)
    u_pad = _round_up(n_unique + 1, 4_096)
    unique = np.concatenate([unique, np.zeros((u_pad - n_unique, 5), np.int64)])
    unique[n_unique:, 3] = 1  # padded tuples (never weighted) are terminal
    tuple_of_row = np.concatenate([tuple_of_row.reshape(-1), np.full(n_pad - n, u_pad - 1)])
    return TabularModel(
        tuple_of_row=jnp.asarray(tuple_of_row, jnp.int32),
        row_valid=jnp.asarray(np.arange(n_pad) < n, jnp.float32),
        pair=jnp.asarray(unique[:, 0] * n_actions + unique[:, 1], jnp.int32),
        state=jnp.asarray(unique[:, 0], jnp.int32),
        next_state=jnp.asarray(unique[:, 2], jnp.int32),
        not_done=jnp.asarray(1 - unique[:, 3], jnp.float32),
        reward=jnp.asarray(unique[:, 4].astype(np.int32).view(np.float32)),
        policy=jnp.asarray(policy),
        episode=jnp.asarray(np.concatenate([np.asarray(fqe.episode), np.zeros(n_pad - n, np.int32)])),
        first_state=jnp.asarray(first_state, jnp.int32),
        first_probs=fqe.first_probs,
        n_states=n_states,
        n_actions=n_actions,
    )


def tabular_fqe(model: TabularModel, gamma: float, counts: jnp.ndarray, n_iterations: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """FQE with one-hot state features. Each FQE iteration is the exact weighted least-squares fit, i.e.
    Q(s, a) = the mean target r + gamma * sum_a' pi(a'|s') Q(s', a') over the logged (s, a); a pair never
    logged takes the mean target of its state (the behaviour's value there), a state never logged the
    overall mean. Every such fit is linear in V(s') = sum_a' pi(a'|s') Q(s', a'), so the iteration is run
    on V with the fitted (S, S) matrix: the same fixed point at a dense matvec per iteration.
    `counts` (E,) weights each episode (bootstrap). Returns (mean V(s_0) over episodes, Q (S, A))."""
    n_states, n_actions = model.n_states, model.n_actions
    n_pairs = n_states * n_actions
    row_weight = counts[model.episode] * model.row_valid
    weight = jax.ops.segment_sum(row_weight, model.tuple_of_row, model.pair.shape[0])  # (U,)
    pair_weight = jax.ops.segment_sum(weight, model.pair, n_pairs)  # (S*A,)
    state_weight = jax.ops.segment_sum(weight, model.state, n_states)  # (S,)
    seen_pair = pair_weight.reshape(n_states, n_actions) > 0
    unseen_mass = (model.policy * ~seen_pair).sum(-1)  # (S,) target mass on never-logged actions
    # share of each tuple in its pair's fit and in its state's fallback fit
    in_pair = weight / jnp.maximum(pair_weight[model.pair], 1e-12)
    in_state = weight / jnp.maximum(state_weight[model.state], 1e-12)
    pi_taken = model.policy.reshape(-1)[model.pair]
    beta = pi_taken * in_pair + unseen_mass[model.state] * in_state  # (U,) weight of tuple u in V(s_u)
    logged = state_weight > 0
    # V(s) = sum_u beta_u (r_u + gamma nd_u V(s'_u)) for logged states, the overall mean for the others
    overall = weight / weight.sum()  # (U,)
    reward_state = jax.ops.segment_sum(beta * model.reward, model.state, n_states)
    reward_state = jnp.where(logged, reward_state, (overall * model.reward).sum())
    step = gamma * model.not_done
    transition = jnp.zeros((n_states, n_states), jnp.float32).at[model.state, model.next_state].add(beta * step)
    overall_row = jnp.zeros(n_states, jnp.float32).at[model.next_state].add(overall * step)
    transition = jnp.where(logged[:, None], transition, overall_row[None, :])

    def iterate(v: jnp.ndarray, _: None) -> tuple[jnp.ndarray, None]:
        return reward_state + transition @ v, None

    # the fixed point by one linear solve (compute-bound, unlike hundreds of memory-bound matvecs), then
    # FQE iterations from it: they keep a correct solve and recover from a singular one (a logged loop
    # that never terminates), which starts them from zero instead
    solved = linear_solve(jnp.eye(n_states, dtype=jnp.float32) - transition, reward_state)
    start = jnp.where(jnp.all(jnp.isfinite(solved)), solved, 0.0)
    v, _ = jax.lax.scan(iterate, start, None, length=n_iterations)
    # Q of the last fit, for WDR and the figures
    target = weight * (model.reward + step * v[model.next_state])
    pair_mean = jax.ops.segment_sum(target, model.pair, n_pairs) / jnp.maximum(pair_weight, 1e-12)
    state_mean = jax.ops.segment_sum(target, model.state, n_states) / jnp.maximum(state_weight, 1e-12)
    fallback = jnp.where(logged, state_mean, target.sum() / weight.sum())
    q = jnp.where(pair_weight > 0, pair_mean, jnp.repeat(fallback, n_actions)).reshape(n_states, n_actions)
    v0 = (model.first_probs * q[model.first_state]).sum(-1)  # (E,)
    return (counts * v0).sum() / counts.sum(), q


def tabular_fqe_bounds(
    model: TabularModel, gamma: float, counts: jnp.ndarray, n_iterations: int, value_bounds: jnp.ndarray
) -> jnp.ndarray:
    """The partial-identification bounds of tabular FQE: (2,) the value from the start with every Q that
    the data do not identify set to its lower bound, then to its upper bound (`value_bounds` (2,)).

    A pair (s, a) the counts never log has no transition to fit; `tabular_fqe` gives it its state's mean
    target (the clinicians' value there), which no resample can question. Here its Q is only known to lie
    in `value_bounds`, and a state never logged likewise. Everything logged is fitted as in `tabular_fqe`
    (mean target per pair), so both ends are linear in V and share one matrix: V = r_seen + m * bound +
    P_seen V, with m(s) the target's mass on unidentified actions (1 for an unlogged state). One solve with
    two right-hand sides gives both, then FQE iterations from them, as in `tabular_fqe`."""
    n_states, n_actions = model.n_states, model.n_actions
    row_weight = counts[model.episode] * model.row_valid
    weight = jax.ops.segment_sum(row_weight, model.tuple_of_row, model.pair.shape[0])  # (U,)
    pair_weight = jax.ops.segment_sum(weight, model.pair, n_states * n_actions)
    state_weight = jax.ops.segment_sum(weight, model.state, n_states)
    seen_pair = pair_weight.reshape(n_states, n_actions) > 0
    logged = state_weight > 0
    unidentified = jnp.where(logged, (model.policy * ~seen_pair).sum(-1), 1.0)  # (S,)
    beta = model.policy.reshape(-1)[model.pair] * weight / jnp.maximum(pair_weight[model.pair], 1e-12)
    step = gamma * model.not_done
    reward_seen = jax.ops.segment_sum(beta * model.reward, model.state, n_states)
    transition = jnp.zeros((n_states, n_states), jnp.float32)
    transition = jnp.where(logged[:, None], transition.at[model.state, model.next_state].add(beta * step), 0.0)
    bounded = unidentified[:, None] * value_bounds[None, :]
    rhs = jnp.where(logged, reward_seen, 0.0)[:, None] + bounded  # (S, 2): lower and upper end

    def iterate(v: jnp.ndarray, _: None) -> tuple[jnp.ndarray, None]:
        return rhs + transition @ v, None

    solved = linear_solve(jnp.eye(n_states, dtype=jnp.float32) - transition, rhs)
    start = jnp.where(jnp.all(jnp.isfinite(solved)), solved, 0.0)
    v, _ = jax.lax.scan(iterate, start, None, length=n_iterations + 1)
    return (counts[:, None] * v[model.first_state]).sum(0) / counts.sum()


@eqx.filter_jit
def _tabular_fqe_bootstrap(
    model: TabularModel, gamma: float, counts: jnp.ndarray, n_iterations: int, value_bounds: jnp.ndarray
):
    ones = jnp.ones(model.first_state.shape[0], jnp.float32)
    value, q = tabular_fqe(model, gamma, ones, n_iterations)
    bounds = tabular_fqe_bounds(model, gamma, ones, n_iterations, value_bounds)

    def refit(c: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
        value_c, q_c = tabular_fqe(model, gamma, c, n_iterations)
        return value_c, q_c, tabular_fqe_bounds(model, gamma, c, n_iterations, value_bounds)

    # resamples in batches of 16: each holds (S, S) matrices
    boot, boot_q, boot_bounds = jax.lax.map(refit, counts, batch_size=16)
    return value, q, boot, bounds, boot_bounds, boot_q


def returns_to_go_range(data: Transitions, layout: EpisodeLayout, gamma: float) -> tuple[float, float]:
    """[min, max] over every logged step of the discounted return from that step to the episode's end:
    the default range of a Q value the data do not identify (the assumption: no unlogged action leads
    outside the outcomes the data show; exact for a terminal survival reward such as ICU-Sepsis's)."""
    reward = layout.pad(np.asarray(data.reward, np.float64))  # (E, T)
    to_go = np.zeros_like(reward)
    running = np.zeros(reward.shape[0])
    for t in range(reward.shape[1] - 1, -1, -1):
        running = reward[:, t] + gamma * running
        to_go[:, t] = running
    to_go = to_go[layout.valid]
    return (float(to_go.min()), float(to_go.max()))


def tabular_fqe_estimate(
    fqe: FQEData,
    state_index: np.ndarray,
    next_state_index: np.ndarray,
    n_states: int,
    gamma: float,
    counts: jnp.ndarray,
    n_iterations: int = 20,
    level: float = 0.95,
    *,
    value_bounds: tuple[float, float],
    return_boot_q: bool = False,
) -> tuple[dict[str, Any], jnp.ndarray] | tuple[dict[str, Any], jnp.ndarray, jnp.ndarray]:
    """Tabular FQE with two intervals. Returns (result, Q).

    `ci_low`, `ci_high`: the fitting interval, percentiles of the refits on every episode resample. It
    omits what no resample can show: the value of actions the data never logged (filled with the
    clinicians' value). `ci_identified`: the partial-identification interval, from the 2.5% quantile of
    the refitted lower bounds (`tabular_fqe_bounds`, unidentified Q at value_bounds[0]) to the 97.5%
    quantile of the refitted upper bounds; it covers the whole identified set with >= 95% (each end
    one-sided 97.5%), so the exact value whenever the bounds hold. return_boot_q: also return the
    resamples' Q tables (B, S, A), for WDR refitted per resample (`wdr_refit_bootstrap`)."""
    low, high = value_bounds
    if not (np.isfinite(low) and np.isfinite(high) and low <= high):
        raise OPEError(f"value bounds must be finite with low <= high; got [{low}, {high}]")
    model = make_tabular_model(fqe, state_index, next_state_index, n_states)
    bounds_array = jnp.asarray([low, high], jnp.float32)
    value, q, boot, bounds, boot_bounds, boot_q = _tabular_fqe_bootstrap(
        model, float(gamma), counts, n_iterations, bounds_array
    )
    boot, boot_bounds = np.asarray(boot), np.asarray(boot_bounds)
    lo, hi = interval(boot, level)
    result = {
        "estimate": float(value),
        "ci_low": lo,
        "ci_high": hi,
        "ci_basic": list(basic_interval(float(value), boot, level)),
        "ci_identified": [interval(boot_bounds[:, 0], level)[0], interval(boot_bounds[:, 1], level)[1]],
        "identified_set": [float(bounds[0]), float(bounds[1])],
        "value_bounds": [float(low), float(high)],
        "boot_std": float(np.std(boot)),
        "features": "one-hot state_index (tabular)",
        "n_iterations": f"exact fixed point (linear solve) + {n_iterations} FQE iterations",
        "interval": "refit on each episode resample",
        "interval_identified": (
            f"partial identification: Q of never-logged (state, action) pairs and states in "
            f"[{low:g}, {high:g}]; "
            "2.5% quantile of the refitted lower bound to 97.5% quantile of the refitted upper bound"
        ),
    }
    if return_boot_q:
        return result, q, boot_q
    return result, q


class QNetwork(eqx.Module):
    layers: list

    def __init__(self, obs_dim: int, n_actions: int, hidden: int, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.layers = [
            eqx.nn.Linear(obs_dim, hidden, key=k1),
            eqx.nn.Linear(hidden, hidden, key=k2),
            eqx.nn.Linear(hidden, n_actions, key=k3),
        ]

    def __call__(self, obs: jnp.ndarray) -> jnp.ndarray:  # (obs_dim,) -> (A,)
        x = obs
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


@dataclass(frozen=True)
class NeuralFQEConfig:
    hidden: int = 128
    n_iterations: int = 40
    steps_per_iteration: int = 250
    batch_size: int = 512
    learning_rate: float = 1e-3


def neural_fqe(
    fqe: FQEData,
    obs: jnp.ndarray,
    next_obs: jnp.ndarray,
    gamma: float,
    key: jax.Array,
    config: NeuralFQEConfig = NeuralFQEConfig(),
    counts: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, QNetwork, jnp.ndarray]:
    """FQE with an MLP: an outer scan of iterations, each regressing Q onto r + gamma * E_{a'~pi_e}
    Q_k(s', a') (built from next_obs; terminated steps do not bootstrap) with an inner scan of Adam
    steps on random minibatches. `counts` (E,) weights each episode (a bootstrap resample: a
    transition's squared error counts as often as its episode was drawn; None: every episode once).
    Returns (value, network, per-iteration loss)."""
    init_key, train_key = jax.random.split(key)
    model = QNetwork(obs.shape[1], fqe.next_probs.shape[1], config.hidden, init_key)
    params, static = eqx.partition(model, eqx.is_array)
    optimiser = optax.adam(config.learning_rate)
    not_done = 1.0 - fqe.terminated.astype(jnp.float32)
    n = obs.shape[0]
    counts = jnp.ones(fqe.first_rows.shape[0], jnp.float32) if counts is None else counts
    row_weight = counts[fqe.episode]  # (N,)

    def q_all(p, x):
        return jax.vmap(eqx.combine(p, static))(x)  # (B, A)

    def loss_fn(p, idx, target):
        q = q_all(p, obs[idx])
        q_taken = jnp.take_along_axis(q, fqe.action[idx, None], axis=1)[:, 0]
        w = row_weight[idx]
        return jnp.sum(w * (q_taken - target) ** 2) / jnp.maximum(w.sum(), 1e-6)

    def outer(carry, key):
        p, opt_state = carry
        frozen = p

        def inner(c, k):
            p, opt_state = c
            idx = jax.random.randint(k, (config.batch_size,), 0, n)
            next_value = (fqe.next_probs[idx] * q_all(frozen, next_obs[idx])).sum(-1)
            target = fqe.reward[idx] + gamma * not_done[idx] * next_value
            loss, grads = jax.value_and_grad(loss_fn)(p, idx, target)
            updates, opt_state = optimiser.update(grads, opt_state, p)
            return (optax.apply_updates(p, updates), opt_state), loss

        (p, opt_state), losses = jax.lax.scan(inner, (p, opt_state), jax.random.split(key, config.steps_per_iteration))
        return (p, opt_state), losses.mean()

    (params, _), losses = jax.lax.scan(
        outer, (params, optimiser.init(params)), jax.random.split(train_key, config.n_iterations)
    )
    network = eqx.combine(params, static)
    v0 = (fqe.first_probs * jax.vmap(network)(obs[fqe.first_rows])).sum(-1)
    return (counts * v0).sum() / counts.sum(), network, losses


@eqx.filter_jit
def _neural_fqe_refits(fqe, obs, next_obs, gamma, keys, counts, config):
    """One refit per row of `counts`, each from its own initialisation and minibatches, under one vmap."""
    return jax.vmap(lambda k, c: neural_fqe(fqe, obs, next_obs, gamma, k, config, c)[0])(keys, counts)


def neural_fqe_estimate(
    fqe: FQEData,
    obs: jnp.ndarray,
    next_obs: jnp.ndarray,
    gamma: float,
    key: jax.Array,
    counts: jnp.ndarray,
    config: NeuralFQEConfig = NeuralFQEConfig(),
    level: float = 0.95,
    n_refits: int = 20,
) -> tuple[dict[str, Any], QNetwork]:
    """Neural FQE. The interval carries the fit's own uncertainty: the network is refitted `n_refits`
    times (vmapped), each on one episode resample (the first rows of `counts`) from a fresh
    initialisation and minibatch stream, and the interval is the estimate +- z * the refits' standard
    deviation (a normal bootstrap interval: a few dozen refits fix a spread, not the 2.5% tails).
    n_refits = 0 keeps the old, cheaper interval: episode resamples of V(s_0) under the one fit, which
    omits the fit's uncertainty (too narrow)."""
    if n_refits < 0:
        raise OPEError(f"n_refits must be >= 0, got {n_refits}")
    refit_key = jax.random.fold_in(key, 1)
    value, network, losses = eqx.filter_jit(neural_fqe)(fqe, obs, next_obs, gamma, key, config)
    result = {
        "estimate": float(value),
        "features": f"MLP on obs ({config.hidden}x2, relu)",
        "n_iterations": config.n_iterations,
        "steps_per_iteration": config.steps_per_iteration,
        "final_loss": float(losses[-1]),
    }
    n_refits = min(n_refits, int(counts.shape[0]))
    if n_refits >= 2:
        keys = jax.random.split(refit_key, n_refits)
        refits = np.asarray(_neural_fqe_refits(fqe, obs, next_obs, gamma, keys, counts[:n_refits], config))
        spread = float(np.std(refits, ddof=1))
        z = float(jax.scipy.stats.norm.ppf((1 + level) / 2))
        result.update(
            ci_low=float(value) - z * spread,
            ci_high=float(value) + z * spread,
            boot_std=spread,
            n_refits=n_refits,
            interval=f"estimate +- {z:.2f} sd of {n_refits} refits on episode resamples (fresh init each)",
        )
    else:
        v0 = (fqe.first_probs * jax.vmap(network)(obs[fqe.first_rows])).sum(-1)
        boot = np.asarray((counts * v0[None, :]).sum(1) / counts.sum(1))
        lo, hi = interval(boot, level)
        result.update(
            ci_low=lo, ci_high=hi, boot_std=float(np.std(boot)), n_refits=0,
            interval="episode resamples of V(s_0) under one fit (omits fit uncertainty)",
        )  # fmt: skip
    return result, network


# ----------------------------------------------------------------------------------------------
# Everything for one target policy


def off_policy_evaluation(
    data: Transitions,
    target_probs: np.ndarray,
    next_target_probs: np.ndarray,
    behavior_prob: np.ndarray,
    *,
    gamma: float,
    epsilon: float = 0.01,
    clip: float | None = None,
    n_boot: int = 200,
    key: jax.Array | None = None,
    fqe: str = "auto",
    n_states: int | None = None,
    neural_config: NeuralFQEConfig = NeuralFQEConfig(),
    action_mask: np.ndarray | None = None,
    next_action_mask: np.ndarray | None = None,
    neural_refits: int = 20,
    behavior_ece: float | None = None,
    value_bounds: tuple[float, float] | None = None,
) -> dict[str, Any]:
    """Estimate the value of the softened target policy with WIS, PDWIS, WDR and FQE.

    target_probs / next_target_probs: (N, A) the target policy at obs / next_obs, before softening.
    behavior_prob: (N,) the behaviour policy's probability of each logged action.
    fqe: "tabular" (one-hot of data.state_index, needs n_states), "neural" (MLP on obs) or "auto"
    (tabular when the data has state indices). All estimators see the same episode resamples.
    neural_refits: refits of neural FQE on episode resamples for its interval (0: one fit, no fit noise).
    behavior_ece: the behaviour model's calibration error on this data, for the warnings (None: unknown).
    value_bounds: the range of any Q value, for tabular FQE's partial-identification interval
    (`ci_identified`); None: the range of the logged returns-to-go (`returns_to_go_range`).
    The result's `warnings` list the small-data problems (`small_data_warnings`) and
    `observed_return` is the clinicians' mean return per episode on this data.
    """
    if fqe not in ("auto", "tabular", "neural"):
        raise OPEError(f"fqe must be 'auto', 'tabular' or 'neural'; got {fqe!r}")
    n = data.size
    target_probs, next_target_probs = np.asarray(target_probs), np.asarray(next_target_probs)
    for name, arr in (("target_probs", target_probs), ("next_target_probs", next_target_probs)):
        if arr.shape[0] != n or arr.ndim != 2:
            raise OPEError(f"{name} has shape {arr.shape}; expected ({n}, n_actions)")
    behavior_prob = np.asarray(behavior_prob)
    if behavior_prob.shape != (n,):
        raise OPEError(f"behavior_prob has shape {behavior_prob.shape}; expected ({n},)")
    if not np.all(np.isfinite(behavior_prob) & (behavior_prob > 0)):
        bad = int(np.flatnonzero(~(np.isfinite(behavior_prob) & (behavior_prob > 0)))[0])
        raise OPEError(
            f"behaviour probability of transition {bad} is {behavior_prob[bad]}; it must be > 0 "
            "(is the behaviour model missing, or does it give the logged action zero probability?)"
        )
    key = jax.random.key(0) if key is None else key
    layout = episode_layout(data.episode_id, data.t)
    soft = np.asarray(soften(target_probs, epsilon, action_mask))
    soft_next = np.asarray(soften(next_target_probs, epsilon, next_action_mask))
    actions = np.asarray(data.action)
    counts = bootstrap_counts(jax.random.fold_in(key, 0), layout.n_episodes, n_boot)

    fqe_data = make_fqe_data(data, layout, soft, soft_next)
    state_index = np.asarray(data.state_index)
    use_tabular = fqe == "tabular" or (fqe == "auto" and n_states is not None and state_index.min() >= 0)
    if use_tabular:
        if n_states is None:
            raise OPEError("tabular FQE needs n_states (the number of tabular states)")
        bounds = returns_to_go_range(data, layout, gamma) if value_bounds is None else value_bounds
        fqe_result, q_table, boot_q = tabular_fqe_estimate(
            fqe_data, state_index, np.asarray(data.next_state_index), n_states, gamma, counts,
            value_bounds=bounds, return_boot_q=True,
        )  # fmt: skip
        q_obs = np.asarray(q_table)[state_index]
        q_next = np.asarray(q_table)[np.clip(np.asarray(data.next_state_index), 0, n_states - 1)]
    else:
        fqe_result, network = neural_fqe_estimate(
            fqe_data, data.obs, data.next_obs, gamma, jax.random.fold_in(key, 1), counts, neural_config,
            n_refits=neural_refits,
        )
        fqe_result.update(ci_identified=None, interval_identified=(
            "none: neural FQE generalises across observations, so no (state, action) pair is 'never logged'; "
            "its partial-identification interval would need a model of the behaviour's support"))  # fmt: skip
        q_obs = np.asarray(jax.vmap(network)(data.obs))
        q_next = np.asarray(jax.vmap(network)(data.next_obs))
    v_state = (soft * q_obs).sum(-1)
    v_next = (soft_next * q_next).sum(-1)
    inputs = make_is_inputs(
        layout,
        np.asarray(data.reward),
        soft[np.arange(n), actions],
        behavior_prob,
        gamma,
        clip,
        q_logged=q_obs[np.arange(n), actions],
        v_state=v_state,
        v_next=v_next,
        truncated=np.asarray(data.truncated),
    )
    estimates = is_estimates(inputs, counts)
    if use_tabular:
        refit_model = make_refit_model_inputs(
            layout, state_index, actions, soft, np.asarray(data.next_state_index), soft_next,
            np.asarray(data.truncated), n_states,
        )  # fmt: skip
        refits = wdr_refit_bootstrap(inputs, refit_model, counts, boot_q)
        boot, boot_var = (np.asarray(x, np.float64) for x in refits)
        w = estimates["wdr"]
        w["ci_refit"] = list(interval(boot, 0.95))
        w["ci_refit_bootstrap_t"] = list(
            bootstrap_t_interval(w["estimate"], w["se"], boot, np.sqrt(np.maximum(boot_var, 0.0)))
        )
        # WDR's interval is the refit one: the only one of those measured that covers on small held-out
        # sets (docs/evaluation.md); the fixed-model percentile interval stays under its own name
        w["ci_fixed_model"] = [w["ci_low"], w["ci_high"]]
        w["ci_low"], w["ci_high"] = w["ci_refit"]
        w["interval"] = "percentile of WDR on each episode resample with FQE refitted on that resample"
    else:
        estimates["wdr"]["interval"] = "percentile of WDR on each episode resample, FQE's Q fixed (one fit)"
    estimates["fqe"] = fqe_result
    weights = weight_stats(inputs)
    returns = np.asarray((inputs.reward * _discounts(inputs)).sum(axis=1))
    return {
        "estimators": estimates,
        "weights": weights,
        "warnings": small_data_warnings(weights, behavior_ece),
        "observed_return": float(returns.mean()),
        "epsilon": epsilon,
        "clip": clip,
        "gamma": gamma,
        "n_boot": n_boot,
        "n_episodes": layout.n_episodes,
        "n_transitions": n,
        "q_values": q_obs,  # (N, A) FQE's Q at the logged states, for figures; not JSON
    }
