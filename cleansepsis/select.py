"""Choose one policy among many checkpoints from held-out data alone, and say how well that worked.

    python -m cleansepsis.select runs/cql__a runs/iql__b --replay data/icu10k.parquet --split val
    python -m cleansepsis.select runs/cql__a --replay data/icu10k.parquet --split val --method wdr --json

Candidates are every checkpoint of every policy in the run folders: summary.json `runs` entries, their
`checkpoints` lists (`--save-every`), or every `checkpoints/*/config.json`. Each is scored on episodes of
`--split` (which the candidates were not trained on) by four methods:

- `fqe`: fitted Q evaluation (tabular on replays with state indices);
- `wdr`: weighted doubly robust with the FQE model;
- `wis`: weighted importance sampling;
- `two-stage`: shortlist the `--shortlist` candidates with the highest WIS estimate (cheap), then rank the
  shortlist by FQE (Tang and Wiens 2021).

Every method gives each candidate an estimate and a 95% interval from one set of bootstrap resamples of
episodes. The selection rule (`--rule`) picks the candidate with the highest lower bound (`lcb`, the AI
Clinician's pessimistic rule) or the highest estimate (`estimate`). Where the truth is known (ICU-Sepsis),
every candidate's exact value is computed and each method's regret (best exact value among the candidates
minus the selected one's) and Spearman rank correlation (estimates against exact values) are reported.

Scoring is batched over candidates: WIS and WDR of all candidates and all resamples are matrix products of
the resample counts with per-episode weight tables, and tabular FQE refits every resample of every
candidate by FQE iterations started from the candidate's full-data fit (`ope.tabular_fqe`). Replays
without state indices (MIMIC-IV) fall back to `ope.off_policy_evaluation` with neural FQE, one candidate at
a time (its interval omits the fit's own uncertainty; see cleansepsis/ope.py).

Writes `selection.json`, `selection.md` and `selection.png` into the first run folder (or `--out`).
For research only; not for treating patients.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import tyro

from cleansepsis import ope
from cleansepsis.checkpoint import CheckpointError
from cleansepsis.io import OutputExistsError, atomic_file
from cleansepsis.model_card import NOTICE
from cleansepsis.policy import Policy, PolicyError, load_policy
from cleansepsis.replay import Replay, ReplayError, Transitions, load_replay

ICU_SEPSIS_SOURCE = "icu-sepsis"
METHODS = ("fqe", "wdr", "wis", "two-stage")
RULES = ("lcb", "estimate")
OUTPUT_FILES = ("selection.json", "selection.md", "selection.png")


class SelectionError(ValueError):
    """Run folders, candidates or options the selection cannot use; the message says which and why."""


@dataclass(frozen=True)
class Args:
    run_dirs: tyro.conf.Positional[tuple[Path, ...]]
    """Run folders whose checkpoints are the candidates."""
    replay: Path | None = None
    """Replay holding the selection episodes; default: the replay the first candidate was trained on."""
    split: Literal["train", "val", "test"] = "val"
    """Split of the replay to select on (whole episodes the candidates were not trained on)."""
    method: Literal["fqe", "wdr", "wis", "two-stage"] = "fqe"
    """Method whose choice is `selected`; every method is scored and reported. FQE measured best with 2,000
    selection episodes, the two-stage rule with 200 (docs/selection.md)."""
    rule: Literal["lcb", "estimate"] = "lcb"
    """Highest lower 95% bound (`lcb`) or highest estimate."""
    shortlist: int = 10
    """Two-stage rule: candidates kept by WIS before FQE ranks them."""
    act: Literal["greedy", "policy"] = "greedy"
    """How a checkpoint acts: argmax of its outputs over admissible actions (how cql, iql and dqn act and
    are scored in training), or its own probabilities (`load_policy(...).action_probs`: softmax of logits)."""
    json: bool = False
    """Print one JSON object (selected, n_candidates, regret and Spearman per method) instead of the table."""
    out: Path | None = None
    """Folder for selection.json, selection.md and selection.png; default: the first run folder."""
    overwrite: bool = False
    """Replace existing selection outputs."""
    behavior: Path | None = None
    """Behaviour-policy checkpoint (bc.py, trained on another split) for replays without behavior_prob."""
    epsilon: float = 0.01
    """Softening of every target policy: (1 - eps) pi + eps uniform(admissible), as in evaluate."""
    clip: float | None = None
    """Cap on cumulative importance weights (none by default)."""
    gamma: float = 1.0
    """Discount of the evaluated return (ICU-Sepsis: 1)."""
    n_boot: int = 200
    """Bootstrap resamples of episodes for the 95% intervals (shared by all methods and candidates)."""
    fqe_interval_top: int = 10
    """Tabular FQE: candidates (by FQE estimate) whose FQE interval is computed by refitting on resamples; the
    two-stage shortlist gets intervals too. Each refit is a linear solve, the costly part of scoring."""
    fqe_boot: int = 100
    """Tabular FQE: resamples (the first of the --n-boot ones) refitted for an FQE interval."""
    seed: int = 0
    """Seed of the bootstrap (and of neural FQE)."""


# ----------------------------------------------------------------------------------------------
# Candidates


@dataclass
class Candidate:
    path: Path
    name: str
    run_dir: Path
    algo: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    setting: int | None = None
    updates: int | None = None


def list_candidates(run_dirs: tuple[Path, ...] | list[Path]) -> list[Candidate]:
    """Every checkpoint of every policy in the run folders, each once, in a fixed order."""
    found: dict[Path, Candidate] = {}
    for run_dir in run_dirs:
        run_dir = Path(run_dir)
        if not run_dir.is_dir():
            raise SelectionError(f"{run_dir}: not a run folder (it does not exist or is a file)")
        entries: list[tuple[str, dict[str, Any]]] = []
        summary_path = run_dir / "summary.json"
        if summary_path.is_file():
            try:
                summary = json.loads(summary_path.read_text())
            except json.JSONDecodeError as err:
                raise SelectionError(f"{summary_path}: not valid JSON ({err})") from None
            final_updates = summary.get("updates_per_policy")
            for entry in summary.get("runs", []):
                if "checkpoint" not in entry:
                    raise SelectionError(f"{summary_path}: a `runs` entry has no 'checkpoint' path")
                for saved in entry.get("checkpoints", []):
                    if "checkpoint" not in saved:
                        raise SelectionError(f"{summary_path}: a `checkpoints` item has no 'checkpoint' path")
                    entries.append((saved["checkpoint"], {**entry, "updates": saved.get("updates")}))
                entries.append((entry["checkpoint"], {**entry, "updates": entry.get("updates", final_updates)}))
        else:
            for config in sorted(run_dir.glob("checkpoints/*/config.json")):
                entries.append((str(config.parent.relative_to(run_dir)), {}))
        if not entries:
            raise SelectionError(f"{run_dir}: no checkpoints (no summary.json runs and no checkpoints/*/config.json)")
        for rel, entry in entries:
            path = run_dir / rel
            key = path.resolve()
            if key in found:
                continue
            config_path = path / "config.json"
            if not config_path.is_file():
                raise SelectionError(f"{run_dir}: checkpoint {rel} listed in summary.json has no config.json")
            try:
                config = json.loads(config_path.read_text())
            except json.JSONDecodeError as err:
                raise SelectionError(f"{config_path}: not valid JSON ({err})") from None
            updates = config.get("updates", entry.get("updates"))
            found[key] = Candidate(
                path=path,
                name=f"{run_dir.name}/{rel}",
                run_dir=run_dir,
                algo=config.get("algo"),
                hparams=dict(config.get("hparams") or entry.get("hparams") or {}),
                seed=config.get("seed", entry.get("seed")),
                setting=config.get("setting", entry.get("setting")),
                updates=None if updates is None else int(updates),
            )
    return list(found.values())


def act_probs(policy: Policy, obs: np.ndarray, mask: np.ndarray | None, act: str) -> np.ndarray:
    """(N, A) probabilities of a checkpoint at obs: greedy over admissible actions, or its own."""
    if act == "policy":
        return np.asarray(policy.action_probs(obs, mask), np.float32)
    out = np.asarray(policy.outputs_of(obs), np.float32)
    return np.asarray(ope.greedy_probs(out, mask), np.float32)


def _unique_rows(obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct rows and the index of each row's distinct row (the network runs once per distinct obs)."""
    unique, inverse = np.unique(np.ascontiguousarray(obs), axis=0, return_inverse=True)
    return unique, inverse.reshape(-1)


# ----------------------------------------------------------------------------------------------
# Batched estimators: importance sampling as matrix products over the bootstrap counts


def cumulative_weights(rho: np.ndarray, clip: float | None) -> np.ndarray:
    """(..., E, T) w_{0:t}, clipped at `clip`, divided by the largest weight at each step over the episodes
    (the same scaling as ope.py: every estimator here normalises per step, so the scale cancels)."""
    log_w = np.cumsum(np.log(np.asarray(rho, np.float64)), axis=-1)
    if clip is not None:
        log_w = np.minimum(log_w, np.log(clip))
    top = log_w.max(axis=-2, keepdims=True)
    return np.exp(log_w - np.where(np.isfinite(top), top, 0.0))


@jax.jit
def batched_wis_wdr(
    weights: jnp.ndarray,  # (K, E, T) cumulative weights, 1-carried after each episode ends
    reward: jnp.ndarray,  # (E, T), 0 in padding
    q_logged: jnp.ndarray,  # (K, E, T)
    v_state: jnp.ndarray,  # (K, E, T)
    tail: jnp.ndarray,  # (K, E) gamma^L * v_tail (truncated episodes), else 0
    discounts: jnp.ndarray,  # (T,)
    counts: jnp.ndarray,  # (B, E) episode counts per resample
) -> tuple[jnp.ndarray, jnp.ndarray]:
    """(K, B) WIS and WDR of every candidate under every resample, the estimators of ope.wis and ope.wdr
    written as contractions over episodes: a step's normalised weight w_it c_i / sum_j w_jt c_j needs only
    the two sums, so each is a (B, E) x (E, T) product."""
    weights = weights.astype(jnp.float32)
    returns = (reward * discounts).sum(-1)  # (E,)
    w_final = weights[:, :, -1]  # (K, E)
    total_final = counts @ w_final.T  # (B, K)
    wis = jnp.where(total_final > 0, (counts @ (w_final * returns).T) / jnp.where(total_final > 0, total_final, 1), jnp.nan)

    total = jnp.einsum("be,ket->kbt", counts, weights)  # (K, B, T)
    safe = jnp.where(total > 0, total, 1.0)
    direct = jnp.einsum("be,ket->kbt", counts, weights * (reward[None] - q_logged)) / safe
    direct = jnp.where(total > 0, direct, 0.0)
    # w_prev: c_i / sum c at t = 0, the normalised w_{0:t-1} after
    first = (counts @ v_state[:, :, 0].T).T / counts.sum(-1)[None, :]  # (K, B)
    prev = jnp.einsum("be,ket->kbt", counts, weights[:, :, :-1] * v_state[:, :, 1:]) / safe[:, :, :-1]
    prev = jnp.where(total[:, :, :-1] > 0, prev, 0.0)
    per_step = direct + jnp.concatenate([first[:, :, None], prev], axis=-1)  # (K, B, T)
    value = (per_step * discounts).sum(-1)
    tail_value = jnp.einsum("be,ke->kb", counts, w_final * tail) / safe[:, :, -1]
    tail_value = jnp.where(total[:, :, -1] > 0, tail_value, 0.0)
    wdr = jnp.where(total[:, :, 0] > 0, value + tail_value, jnp.nan)
    return wis.T, wdr


# ----------------------------------------------------------------------------------------------
# Batched tabular FQE: one shared model of the logged tuples, one policy table per candidate


def _stack_policy(model: ope.TabularModel, policies: jnp.ndarray, first_probs: jnp.ndarray) -> ope.TabularModel:
    return eqx.tree_at(lambda m: (m.policy, m.first_probs), model, (policies, first_probs))


@eqx.filter_jit
def _fqe_points(model: ope.TabularModel, policies: jnp.ndarray, first_state: jnp.ndarray, gamma: float):
    """ope.tabular_fqe on the full data for each candidate's policy: (K,) values and (K, S, A) Q. Each
    candidate's first-step probabilities are gathered inside the map, so no (K, E, A) array is held."""
    ones = jnp.ones(model.first_state.shape[0], jnp.float32)

    def one(policy):
        return ope.tabular_fqe(_stack_policy(model, policy, policy[first_state]), gamma, ones, 20)

    return jax.lax.map(one, policies)


@eqx.filter_jit
def _fqe_refits(model: ope.TabularModel, policies: jnp.ndarray, first_state: jnp.ndarray, gamma: float,
                counts: jnp.ndarray) -> jnp.ndarray:  # fmt: skip
    """(K, B) ope.tabular_fqe refit on every resample of every given candidate: a linear solve each, so
    this is the expensive part of scoring and runs only for the candidates that need an FQE interval."""

    def one(policy):
        model_k = _stack_policy(model, policy, policy[first_state])
        return jax.lax.map(lambda c: ope.tabular_fqe(model_k, gamma, c, 20)[0], counts)

    return jax.lax.map(one, policies)


# ----------------------------------------------------------------------------------------------
# Scoring


@dataclass
class Scores:
    """Per method: (K,) estimates and interval bounds; weight diagnostics per candidate."""

    estimate: dict[str, np.ndarray]
    ci_low: dict[str, np.ndarray]
    ci_high: dict[str, np.ndarray]
    ess: np.ndarray
    max_weight: np.ndarray
    fqe_kind: str
    n_episodes: int
    n_transitions: int


def _intervals(boot: np.ndarray, level: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    pairs = [ope.interval(b, level) for b in boot]
    return np.array([p[0] for p in pairs]), np.array([p[1] for p in pairs])


def score_tabular(
    data: Transitions,
    policy_tables: np.ndarray,  # (K, S, A) softened target policies per state
    behavior_logged: np.ndarray,  # (N,)
    *,
    gamma: float,
    clip: float | None,
    n_boot: int,
    key: jax.Array,
    fqe_interval_top: int = 10,
    shortlist: int = 10,
    fqe_boot: int = 100,
    chunk: int = 16,
) -> Scores:
    """WIS, WDR and tabular FQE of K candidates given as (softened) policy tables over state indices.

    Every candidate gets all three estimates and WIS / WDR intervals. FQE intervals refit FQE on each of
    the first `fqe_boot` resamples (a linear solve each), so they are computed for the candidates that a
    rule can pick from: the `fqe_interval_top` highest FQE estimates and the `shortlist` highest WIS
    estimates (the two-stage shortlist); the others' FQE intervals are NaN."""
    n_cand, n_states, _ = policy_tables.shape
    layout = ope.episode_layout(data.episode_id, data.t)
    counts = ope.bootstrap_counts(jax.random.fold_in(key, 0), layout.n_episodes, n_boot)
    state = np.asarray(data.state_index, np.int64)
    next_state = np.clip(np.asarray(data.next_state_index, np.int64), 0, n_states - 1)
    if state.min() < 0 or state.max() >= n_states:
        raise SelectionError(f"state_index outside 0..{n_states - 1}: tabular scoring needs state indices")
    actions = np.asarray(data.action, np.int64)
    behavior_logged = np.asarray(behavior_logged, np.float64)
    if not np.all(np.isfinite(behavior_logged) & (behavior_logged > 0)):
        bad = int(np.flatnonzero(~(np.isfinite(behavior_logged) & (behavior_logged > 0)))[0])
        raise SelectionError(f"behaviour probability of transition {bad} is {behavior_logged[bad]}; it must be > 0")

    # one tabular model of the logged tuples, shared by every candidate (its policy is replaced per candidate)
    base = ope.make_fqe_data(data, layout, policy_tables[0][state], policy_tables[0][next_state])
    model = ope.make_tabular_model(base, state, next_state, n_states)
    first_state = jnp.asarray(state[layout.first_rows])
    tables = jnp.asarray(policy_tables, jnp.float32)
    values, q_tables = _fqe_points(model, tables, first_state, float(gamma))
    values, q_tables = np.asarray(values), np.asarray(q_tables)  # (K,), (K, S, A)
    policy_tables = np.asarray(policy_tables)
    v_tables = (policy_tables * q_tables).sum(-1)  # (K, S)

    # importance sampling, `chunk` candidates at a time: the (K, E, T) weight tables of every candidate at
    # once would take gigabytes on a large held-out set (280 candidates x 20,000 episodes)
    reward = layout.pad(np.asarray(data.reward, np.float32))
    truncated = np.asarray(data.truncated)[layout.last_rows]
    tail_states = next_state[layout.last_rows]
    discounts = gamma ** np.arange(reward.shape[1], dtype=np.float64)
    all_counts = jnp.concatenate([jnp.ones((1, layout.n_episodes), jnp.float32), counts])
    wis_all, wdr_all, raw_final = [], [], []
    for i in range(0, n_cand, chunk):
        part = slice(i, i + chunk)
        target_logged = policy_tables[part][:, state, actions]  # (k, N)
        rho = layout.pad((target_logged / behavior_logged[None]).T.astype(np.float64), 1.0)  # (E, T, k)
        rho = np.moveaxis(rho, -1, 0)  # (k, E, T)
        q_logged = np.moveaxis(layout.pad(q_tables[part][:, state, actions].T.astype(np.float32)), -1, 0)
        v_state = np.moveaxis(layout.pad(v_tables[part][:, state].T.astype(np.float32)), -1, 0)
        tail = (gamma ** layout.lengths)[None] * np.where(truncated[None], v_tables[part][:, tail_states], 0.0)
        # float32 numpy arrays go in as they are (jnp.asarray would compile an identity program per shape)
        w, d = batched_wis_wdr(
            jnp.asarray(cumulative_weights(rho, clip), jnp.float32), reward, q_logged, v_state,
            jnp.asarray(tail, jnp.float32), jnp.asarray(discounts, jnp.float32), all_counts,
        )  # fmt: skip
        wis_all.append(np.asarray(w))
        wdr_all.append(np.asarray(d))
        raw_final.append(np.exp(np.log(rho).sum(-1)))  # (k, E) episode weights before clipping
    wis_all, wdr_all, raw_final = np.concatenate(wis_all), np.concatenate(wdr_all), np.concatenate(raw_final)

    used = raw_final if clip is None else np.minimum(raw_final, clip)
    scaled = used / np.maximum(used.max(-1, keepdims=True), 1e-300)
    ess = scaled.sum(-1) ** 2 / np.maximum((scaled**2).sum(-1), 1e-300)

    estimate = {"fqe": values, "wis": wis_all[:, 0], "wdr": wdr_all[:, 0]}
    lows, highs = {}, {}
    for name, boot in (("wis", wis_all[:, 1:]), ("wdr", wdr_all[:, 1:])):
        lows[name], highs[name] = _intervals(boot)

    wanted = np.zeros(n_cand, bool)
    wanted[_top(values, fqe_interval_top)] = True
    wanted[_top(estimate["wis"], shortlist)] = True
    chosen = np.flatnonzero(wanted)
    lows["fqe"], highs["fqe"] = np.full(n_cand, np.nan), np.full(n_cand, np.nan)
    if len(chosen) and fqe_boot > 0:
        refits = np.concatenate([
            np.asarray(_fqe_refits(model, tables[chosen[i:i + chunk]], first_state, float(gamma), counts[:fqe_boot]))
            for i in range(0, len(chosen), chunk)
        ])  # fmt: skip
        lows["fqe"][chosen], highs["fqe"][chosen] = _intervals(refits)
    kind = (f"tabular (one-hot state_index); intervals refit FQE on {min(fqe_boot, n_boot)} episode resamples, for "
            f"the {len(chosen)} candidates among the {fqe_interval_top} highest FQE and {shortlist} highest WIS "
            "estimates")  # fmt: skip
    return Scores(estimate, lows, highs, ess, raw_final.max(-1), kind, layout.n_episodes, data.size)


def _top(values: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m highest values (NaN lowest; ties to the lower index)."""
    values = np.nan_to_num(np.asarray(values, np.float64), nan=-np.inf)
    return np.lexsort((np.arange(len(values)), -values))[: max(0, m)]


def score_per_candidate(
    data: Transitions,
    probs: list[tuple[np.ndarray, np.ndarray]],
    behavior_logged: np.ndarray,
    *,
    gamma: float,
    epsilon: float,
    clip: float | None,
    n_boot: int,
    key: jax.Array,
    action_mask: np.ndarray | None,
    next_action_mask: np.ndarray | None,
) -> Scores:
    """ope.off_policy_evaluation with neural FQE, one candidate at a time (replays without state indices)."""
    keys = ("fqe", "wis", "wdr")
    est, lo, hi = ({k: [] for k in keys} for _ in range(3))
    ess, max_w = [], []
    result: dict[str, Any] = {}
    for target, next_target in probs:
        result = ope.off_policy_evaluation(
            data, target, next_target, behavior_logged, gamma=gamma, epsilon=epsilon, clip=clip, n_boot=n_boot,
            key=key, fqe="neural", action_mask=action_mask, next_action_mask=next_action_mask,
        )  # fmt: skip
        for k in keys:
            e = result["estimators"][k]
            est[k].append(e["estimate"])
            lo[k].append(e["ci_low"])
            hi[k].append(e["ci_high"])
        ess.append(result["weights"]["ess"])
        max_w.append(result["weights"]["max_weight"])
    arr = {k: {m: np.asarray(v[m], np.float64) for m in keys} for k, v in (("e", est), ("l", lo), ("h", hi))}
    fqe_kind = result["estimators"]["fqe"]["features"] + "; interval: " + result["estimators"]["fqe"]["interval"]
    return Scores(arr["e"], arr["l"], arr["h"], np.asarray(ess), np.asarray(max_w), fqe_kind,
                  int(result["n_episodes"]), int(result["n_transitions"]))  # fmt: skip


def add_two_stage(scores: Scores, shortlist: int) -> np.ndarray:
    """Two-stage scores: the `shortlist` candidates with the highest WIS keep their FQE estimate and
    interval; the others rank below every shortlisted one, in WIS order. Returns the shortlist mask."""
    k = len(scores.estimate["wis"])
    m = max(1, min(shortlist, k))
    wis = np.nan_to_num(scores.estimate["wis"], nan=-np.inf)
    order = np.lexsort((np.arange(k), -wis))  # highest WIS first, lowest index on ties
    kept = np.zeros(k, bool)
    kept[order[:m]] = True
    floor = np.nanmin(np.concatenate([scores.ci_low["fqe"], scores.estimate["fqe"]])) - 1.0
    # outside the shortlist: below every FQE figure, ordered by WIS (so the ranking is complete)
    rank_wis = np.empty(k)
    rank_wis[order] = np.arange(k)
    outside = floor - rank_wis / max(k, 1)
    scores.estimate["two-stage"] = np.where(kept, scores.estimate["fqe"], outside)
    scores.ci_low["two-stage"] = np.where(kept, scores.ci_low["fqe"], outside)
    scores.ci_high["two-stage"] = np.where(kept, scores.ci_high["fqe"], outside)
    return kept


# ----------------------------------------------------------------------------------------------
# Selection measures


def rankdata(values: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties given their average rank."""
    values = np.asarray(values, np.float64)
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values))
    sorted_values = values[order]
    i = 0
    while i < len(values):
        j = i
        while j + 1 < len(values) and sorted_values[j + 1] == sorted_values[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def spearman(estimates: np.ndarray, truth: np.ndarray) -> float:
    """Spearman rank correlation (Pearson correlation of average ranks); NaN estimates rank lowest; NaN
    when either side is constant."""
    est = np.nan_to_num(np.asarray(estimates, np.float64), nan=-np.inf)
    a, b = rankdata(est), rankdata(truth)
    a, b = a - a.mean(), b - b.mean()
    denom = np.sqrt((a**2).sum() * (b**2).sum())
    return float((a * b).sum() / denom) if denom > 0 else float("nan")


def select_index(scores: Scores, method: str, rule: str) -> int:
    """The candidate a method and rule pick: highest lower bound or estimate; ties to the higher
    estimate, then the lower index. Raises if no candidate has a finite score."""
    primary = scores.ci_low[method] if rule == "lcb" else scores.estimate[method]
    primary = np.nan_to_num(np.asarray(primary, np.float64), nan=-np.inf)
    secondary = np.nan_to_num(np.asarray(scores.estimate[method], np.float64), nan=-np.inf)
    if not np.isfinite(primary).any():
        raise SelectionError(f"method {method!r} gives no finite {rule} for any candidate (all weights zero?)")
    order = np.lexsort((np.arange(len(primary)), -secondary, -primary))
    return int(order[0])


def regret(exact: np.ndarray, chosen: int) -> float:
    exact = np.asarray(exact, np.float64)
    return float(exact.max() - exact[chosen])


def top_k_regret(exact: np.ndarray, ranking_scores: np.ndarray, k: int) -> float:
    """Best exact value overall minus the best exact value among the k highest-scored candidates."""
    exact = np.asarray(exact, np.float64)
    scores = np.nan_to_num(np.asarray(ranking_scores, np.float64), nan=-np.inf)
    top = np.lexsort((np.arange(len(scores)), -scores))[:k]
    return float(exact.max() - exact[top].max())


# ----------------------------------------------------------------------------------------------
# Exact values (ICU-Sepsis)


def exact_tables(policies: list[Policy], act: str) -> tuple[np.ndarray, np.ndarray] | None:
    """Exact values (K,) of each candidate and of its softened version need the (716, 25) policy tables;
    returns (tables (K, 716, 25), admissible mask) or None when the candidates are not ICU-Sepsis policies."""
    from cleansepsis import env

    for p in policies:
        if p.config.get("replay_source") != ICU_SEPSIS_SOURCE or list(p.config.get("feature_names") or []) != list(
            env.FEATURE_NAMES
        ):
            return None
    params = env.load_params()
    mask = np.asarray(params.admissible_mask)
    states = np.asarray(params.state_vectors)
    return np.stack([act_probs(p, states, mask, act) for p in policies]), mask


def exact_values(tables: np.ndarray, mask: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """(exact value, exact value of the softened policy) per candidate, by the env's linear solve."""
    from cleansepsis import env

    params = env.load_params()
    soft = np.asarray(ope.soften(tables.reshape(-1, tables.shape[-1]), epsilon, np.tile(mask, (len(tables), 1))))
    soft = soft.reshape(tables.shape)

    def values(stack: np.ndarray) -> np.ndarray:  # in chunks: each policy holds a (716, 716) system
        return np.concatenate([np.asarray(env.policy_evaluation(jnp.asarray(stack[i:i + 16], jnp.float32), params)[0])
                               for i in range(0, len(stack), 16)]).astype(np.float64)  # fmt: skip

    return values(tables), values(soft)


# ----------------------------------------------------------------------------------------------
# The command


@dataclass
class Scored:
    """Everything scoring produced, from which a report for any rule is built without scoring again."""

    replay: Replay
    candidates: list[Candidate]
    scores: Scores
    shortlist: np.ndarray
    exact: np.ndarray | None
    exact_soft: np.ndarray | None


def run_selection(args: Args, log=print) -> dict[str, Any]:
    """Score every candidate, select, and build the report (nothing written)."""
    scored = score_candidates(args, log)
    return build_report(args, scored.replay, scored.candidates, scored.scores, scored.shortlist, scored.exact,
                        scored.exact_soft)  # fmt: skip


def score_candidates(args: Args, log=print) -> Scored:
    """Load the candidates and the selection episodes, and score every candidate by every method."""
    if not args.run_dirs:
        raise SelectionError("give at least one run folder")
    if args.shortlist < 1:
        raise SelectionError(f"--shortlist must be at least 1, got {args.shortlist}")
    if args.n_boot < 10:
        raise SelectionError(f"--n-boot must be at least 10 for a 95% interval, got {args.n_boot}")
    if not 0.0 <= args.epsilon < 1.0:
        raise SelectionError(f"--epsilon must be in [0, 1), got {args.epsilon}")
    candidates = list_candidates(args.run_dirs)
    replay_path = args.replay
    if replay_path is None:
        config = json.loads((candidates[0].path / "config.json").read_text())
        if not config.get("replay_path"):
            raise SelectionError(f"{candidates[0].path}: config has no replay_path; pass --replay PATH")
        replay_path = Path(config["replay_path"])
    replay = load_replay(replay_path)
    data = replay.split(args.split)
    policies = [load_policy(c.path, replay) for c in candidates]
    if args.split == "train":
        trained_here = [c.name for c, p in zip(candidates, policies, strict=True)
                        if p.config.get("replay_hash") == replay.content_hash]  # fmt: skip
        if trained_here:
            raise SelectionError(
                f"{trained_here[0]} was trained on split 'train' of {replay.path}; select on episodes it has not "
                "seen (--split val or test)"
            )
    behaviour = _behaviour(replay, data, args)
    log(f"select: {len(candidates)} candidates from {len(args.run_dirs)} run folder(s) on {replay.path} split "
        f"{args.split} ({data.size} transitions)")  # fmt: skip

    mask = np.asarray(data.action_mask) if replay.has["action_mask"] else None
    next_mask = np.asarray(data.next_action_mask) if replay.has["next_action_mask"] else None
    obs, next_obs = np.asarray(data.obs), np.asarray(data.next_obs)
    key = jax.random.key(args.seed)
    tabular = replay.has["state_index"] and int(np.asarray(data.state_index).min()) >= 0
    if tabular:
        n_states = 716 if replay.meta.get("source") == ICU_SEPSIS_SOURCE else int(
            max(np.asarray(data.state_index).max(), np.asarray(data.next_state_index).max()) + 1)  # fmt: skip
        tables = _policy_tables(policies, data, obs, next_obs, mask, next_mask, n_states, args)
        scores = score_tabular(data, tables, behaviour, gamma=args.gamma, clip=args.clip, n_boot=args.n_boot,
                               key=key, fqe_interval_top=args.fqe_interval_top,
                               shortlist=args.shortlist, fqe_boot=args.fqe_boot)  # fmt: skip
    else:
        probs = [(act_probs(p, obs, mask, args.act), act_probs(p, next_obs, next_mask, args.act)) for p in policies]
        scores = score_per_candidate(data, probs, behaviour, gamma=args.gamma, epsilon=args.epsilon, clip=args.clip,
                                     n_boot=args.n_boot, key=key, action_mask=mask, next_action_mask=next_mask)  # fmt: skip
    shortlist = add_two_stage(scores, args.shortlist)

    truth = exact_tables(policies, args.act)
    exact = exact_soft = None
    if truth is not None:
        exact, exact_soft = exact_values(truth[0], truth[1], args.epsilon)
    return Scored(replay, candidates, scores, shortlist, exact, exact_soft)


def _behaviour(replay: Replay, data: Transitions, args: Args) -> np.ndarray:
    from cleansepsis import evaluate

    eval_args = evaluate.Args(run_dirs=args.run_dirs, replay=args.replay, split=args.split, behavior=args.behavior)
    try:
        return np.asarray(evaluate.behaviour_model(replay, data, eval_args)["logged"], np.float64)
    except evaluate.EvaluationError as err:
        raise SelectionError(str(err)) from None


def _policy_tables(policies, data, obs, next_obs, mask, next_mask, n_states, args) -> np.ndarray:
    """(K, S, A) softened policy of each candidate per state index, from the rows where the state appears
    (as obs, or as next_obs of a step that did not terminate); states never seen are uniform."""
    state = np.asarray(data.state_index, np.int64)
    next_state = np.asarray(data.next_state_index, np.int64)
    live = ~np.asarray(data.terminated) & (next_state >= 0)
    all_obs = np.concatenate([obs, next_obs[live]])
    all_state = np.concatenate([state, next_state[live]])
    n_actions = policies[0].n_actions
    all_mask = None
    if mask is not None:
        all_mask = np.concatenate([mask, next_mask[live] if next_mask is not None else np.ones((live.sum(), n_actions), bool)])
    # one row per state (observations are a function of the state on tabular replays)
    states, first_row = np.unique(all_state, return_index=True)
    rows_obs = all_obs[first_row]
    rows_mask = None if all_mask is None else all_mask[first_row]
    tables = np.full((len(policies), n_states, n_actions), 1.0 / n_actions, np.float32)
    for k, policy in enumerate(policies):
        probs = act_probs(policy, rows_obs, rows_mask, args.act)
        tables[k, states] = ope.soften(probs, args.epsilon, rows_mask)
    return tables


def build_report(args, replay, candidates, scores: Scores, shortlist, exact, exact_soft) -> dict[str, Any]:
    k = len(candidates)
    rows = []
    for i, c in enumerate(candidates):
        row = {
            "name": c.name, "path": str(c.path), "algo": c.algo, "hparams": c.hparams, "seed": c.seed,
            "setting": c.setting, "updates": c.updates, "ess": float(scores.ess[i]),
            "max_weight": float(scores.max_weight[i]), "shortlisted": bool(shortlist[i]),
            "estimates": {m: {"estimate": _f(scores.estimate[m][i]), "ci_low": _f(scores.ci_low[m][i]),
                              "ci_high": _f(scores.ci_high[m][i])} for m in METHODS if m != "two-stage"},
        }  # fmt: skip
        if exact is not None:
            row["exact_return"] = float(exact[i])
            row["exact_return_softened"] = float(exact_soft[i])
        rows.append(row)
    methods = {}
    for m in METHODS:
        chosen = select_index(scores, m, args.rule)
        entry: dict[str, Any] = {
            "index": chosen,
            "path": str(candidates[chosen].path),
            "name": candidates[chosen].name,
            "estimate": _f(scores.estimate[m][chosen]),
            "ci_low": _f(scores.ci_low[m][chosen]),
            "ci_high": _f(scores.ci_high[m][chosen]),
        }
        if m == "two-stage":
            entry["shortlist"] = int(shortlist.sum())
        if exact is not None:
            entry["exact_return"] = float(exact[chosen])
            entry["regret"] = regret(exact, chosen)
            entry["spearman"] = _f(spearman(scores.estimate[m], exact))
            entry["top5_regret"] = top_k_regret(exact, scores.estimate[m], 5)
            # the interval is for the softened policy (importance sampling needs it)
            entry["covers_exact_softened"] = (None if entry["ci_low"] is None or entry["ci_high"] is None
                                              else bool(entry["ci_low"] <= exact_soft[chosen] <= entry["ci_high"]))  # fmt: skip
        methods[m] = entry
    selected = dict(methods[args.method])
    report: dict[str, Any] = {
        "method": args.method,
        "rule": args.rule,
        "rule_text": ("highest lower bound of the 95% bootstrap interval" if args.rule == "lcb" else "highest estimate")
        + "; ties to the higher estimate, then the first candidate",
        "selected": selected,
        "n_candidates": k,
        "methods": methods,
        "candidates": rows,
        "replay": {"path": str(replay.path), "content_hash": replay.content_hash, "source": replay.meta.get("source"),
                   "split": args.split, "n_episodes": scores.n_episodes, "n_transitions": scores.n_transitions},
        "settings": {kk: (str(v) if isinstance(v, Path) else v) for kk, v in asdict(args).items()
                     if kk not in ("run_dirs", "json", "out", "overwrite")},
        "run_dirs": [str(d) for d in args.run_dirs],
        "fqe": scores.fqe_kind,
        "notice": NOTICE,
    }  # fmt: skip
    if exact is not None:
        best = int(np.argmax(exact))
        report["oracle_best_exact"] = float(exact[best])
        report["oracle_best"] = candidates[best].name
        report["regret"] = {m: methods[m]["regret"] for m in METHODS}
        report["spearman"] = {m: methods[m]["spearman"] for m in METHODS}
    return report


def _f(x: Any) -> float | None:
    x = float(x)
    return x if np.isfinite(x) else None


# ----------------------------------------------------------------------------------------------
# Outputs


def _fmt(x: float | None, digits: int = 4) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def markdown(report: dict[str, Any], top: int = 20) -> str:
    s = report["settings"]
    sel = report["selected"]
    lines = [
        f"# Policy selection over {report['n_candidates']} candidates",
        "",
        report["notice"],
        "",
        f"Run folders: {', '.join(f'`{d}`' for d in report['run_dirs'])}. Selection episodes: replay "
        f"`{report['replay']['path']}` split `{report['replay']['split']}` ({report['replay']['n_episodes']} "
        f"episodes, {report['replay']['n_transitions']} transitions). Targets act `{s['act']}`, softened with "
        f"epsilon {s['epsilon']}; {s['n_boot']} bootstrap resamples of episodes; FQE: {report['fqe']}.",
        "",
        f"**Selected** by `{report['method']}` ({report['rule_text']}): `{sel['name']}`, estimate "
        f"{_fmt(sel['estimate'])} [{_fmt(sel['ci_low'])}, {_fmt(sel['ci_high'])}]"
        + (f", exact return {sel['exact_return']:.4f}." if "exact_return" in sel else "."),
        "",
        "## Every method",
        "",
    ]
    known = "oracle_best_exact" in report
    if known:
        lines += [f"Best exact return among the candidates (oracle): {report['oracle_best_exact']:.4f} "
                  f"(`{report['oracle_best']}`).", "",
                  "| method | selected | estimate [95%] | exact | regret | top-5 regret | Spearman |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
    else:
        lines += ["| method | selected | estimate [95%] |", "|---|---|---|"]
    for m, e in report["methods"].items():
        cell = f"| {m} | `{e['name']}` | {_fmt(e['estimate'])} [{_fmt(e['ci_low'])}, {_fmt(e['ci_high'])}] |"
        if known:
            cell += f" {e['exact_return']:.4f} | {e['regret']:.4f} | {e['top5_regret']:.4f} | {_fmt(e['spearman'], 3)} |"
        lines.append(cell)
    method = report["method"]
    order = sorted(
        range(report["n_candidates"]),
        key=lambda i: -(_score(report["candidates"][i], method, report["rule"], report["methods"]) or -np.inf),
    )
    lines += ["", f"## Ranking by `{method}` ({report['rule']}), top {min(top, len(order))}", "",
              "| rank | candidate | updates | FQE [95%] | WDR | WIS | ESS | exact |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r, i in enumerate(order[:top]):
        c = report["candidates"][i]
        e = c["estimates"]
        lines.append(
            f"| {r + 1} | `{c['name']}` | {c['updates'] if c['updates'] is not None else '?'} | "
            f"{_fmt(e['fqe']['estimate'])} [{_fmt(e['fqe']['ci_low'])}, {_fmt(e['fqe']['ci_high'])}] | "
            f"{_fmt(e['wdr']['estimate'])} | {_fmt(e['wis']['estimate'])} | {c['ess']:.1f} | "
            f"{_fmt(c.get('exact_return'))} |"
        )
    lines += ["", "Figure: `selection.png`.", ""]
    return "\n".join(lines)


def _score(row: dict[str, Any], method: str, rule: str, methods: dict[str, Any]) -> float | None:
    source = "fqe" if method == "two-stage" else method
    if method == "two-stage" and not row["shortlisted"]:
        return -1e9 + (row["estimates"]["wis"]["estimate"] or -1e6)
    return row["estimates"][source]["ci_low" if rule == "lcb" else "estimate"]


def figure_png(report: dict[str, Any]) -> bytes:
    """Estimate against exact value for every candidate and method (when the truth is known), else the
    selected method's estimates with intervals in rank order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cands = report["candidates"]
    if "oracle_best_exact" in report:
        panels = ["fqe", "wdr", "wis"]
        fig, axes = plt.subplots(1, 3, figsize=(13.5, 4.4), squeeze=False)
        exact = np.array([c["exact_return"] for c in cands])
        for ax, m in zip(axes[0], panels, strict=True):
            est = np.array([np.nan if c["estimates"][m]["estimate"] is None else c["estimates"][m]["estimate"]
                            for c in cands])  # fmt: skip
            lo = np.array([np.nan if c["estimates"][m]["ci_low"] is None else c["estimates"][m]["ci_low"] for c in cands])
            hi = np.array([np.nan if c["estimates"][m]["ci_high"] is None else c["estimates"][m]["ci_high"] for c in cands])
            algos = sorted({str(c["algo"]) for c in cands})
            for j, algo in enumerate(algos):
                idx = np.array([str(c["algo"]) == algo for c in cands])
                ax.errorbar(exact[idx], est[idx], yerr=[est[idx] - lo[idx], hi[idx] - est[idx]], fmt="o", ms=3,
                            color=f"C{j}", alpha=0.6, elinewidth=0.5, label=algo)  # fmt: skip
            chosen = report["methods"][m]["index"]
            ax.plot(exact[chosen], est[chosen], "r*", ms=14, label=f"selected ({report['rule']})")
            ax.axvline(report["oracle_best_exact"], color="gray", ls=":", lw=1, label="oracle best")
            finite = np.isfinite(est)
            span = [min(exact.min(), np.nanmin(est[finite]) if finite.any() else exact.min()),
                    max(exact.max(), np.nanmax(est[finite]) if finite.any() else exact.max())]  # fmt: skip
            ax.plot(span, span, color="black", lw=0.6, ls="--")
            ax.set_title(f"{m.upper()}: Spearman {_fmt(report['methods'][m]['spearman'], 3)}, regret "
                         f"{report['methods'][m]['regret']:.4f}", fontsize=9)  # fmt: skip
            ax.set_xlabel("exact return")
            ax.set_ylabel("estimate (95% interval)")
            ax.legend(fontsize=7)
        fig.suptitle(f"{report['n_candidates']} candidates on split {report['replay']['split']} "
                     f"({report['replay']['n_episodes']} episodes)", fontsize=10)  # fmt: skip
    else:
        m = "fqe" if report["method"] == "two-stage" else report["method"]
        est = np.array([c["estimates"][m]["estimate"] or np.nan for c in cands])
        order = np.argsort(-np.nan_to_num(est, nan=-np.inf))[:40]
        fig, ax = plt.subplots(figsize=(7, 0.22 * len(order) + 1.5))
        for y, i in enumerate(order[::-1]):
            e = cands[i]["estimates"][m]
            if e["estimate"] is None:
                continue
            ax.errorbar(e["estimate"], y, xerr=[[e["estimate"] - e["ci_low"]], [e["ci_high"] - e["estimate"]]],
                        fmt="o", ms=3, color="C0")  # fmt: skip
        ax.set_yticks(range(len(order)), [cands[i]["name"] for i in order[::-1]], fontsize=6)
        ax.set_xlabel(f"{m.upper()} estimate (95% interval)")
        ax.set_title("Candidates by estimate (the exact values are unknown)", fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(report: dict[str, Any], folder: Path, overwrite: bool) -> None:
    """Everything is rendered before the first file is written; each file is written atomically."""
    if not overwrite:
        for name in OUTPUT_FILES:
            if (folder / name).exists():
                raise OutputExistsError(f"{folder / name} already exists; pass --overwrite to replace it")
    text_json = json.dumps(report, indent=2, sort_keys=True, default=_json_default) + "\n"
    text_md = markdown(report)
    png = figure_png(report)
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in (("selection.json", text_json), ("selection.md", text_md), ("selection.png", png)):
        with atomic_file(folder / name, overwrite=True) as tmp:
            if isinstance(content, bytes):
                tmp.write_bytes(content)
            else:
                tmp.write_text(content)


def summary_json(report: dict[str, Any]) -> dict[str, Any]:
    """The one JSON object `--json` prints."""
    keep = ("path", "name", "estimate", "ci_low", "ci_high", "exact_return", "regret")
    out: dict[str, Any] = {
        "method": report["method"],
        "rule": report["rule"],
        "selected": {k: report["selected"][k] for k in keep if k in report["selected"]},
        "n_candidates": report["n_candidates"],
        "selected_by_method": {m: {k: e[k] for k in keep if k in e} for m, e in report["methods"].items()},
    }
    for k in ("oracle_best_exact", "oracle_best", "regret", "spearman"):
        if k in report:
            out[k] = report[k]
    return out


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    return str(obj)


def main(argv: list[str] | None = None) -> int:
    args = tyro.cli(Args, args=argv, description=__doc__)

    def log(*parts: Any) -> None:
        print(*parts, file=sys.stderr, flush=True)

    try:
        folder = args.out if args.out is not None else (Path(args.run_dirs[0]) if args.run_dirs else None)
        if folder is not None and not args.overwrite:
            for name in OUTPUT_FILES:
                if (folder / name).exists():
                    raise OutputExistsError(f"{folder / name} already exists; pass --overwrite to replace it")
        report = run_selection(args, log)
        write_outputs(report, folder, args.overwrite)
    except (SelectionError, ReplayError, CheckpointError, PolicyError, OutputExistsError, ope.OPEError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(summary_json(report), indent=2, sort_keys=True, default=_json_default))
    else:
        print(markdown(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
