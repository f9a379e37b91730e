"""The Oberst-Sontag sepsis simulator (ICML 2019) as an exact finite MDP of the core (`cleansepsis.mdp`).

The "8-action diabetes sepsis simulator" of clinicalml/gumbel-max-scm (`sepsisSimDiabetes`): seven categorical
variables (heart rate 3, systolic BP 3, O2 saturation 2, glucose 5, antibiotics/vasopressors/ventilation on)
plus a hidden diabetes flag, 1440 full states; 8 actions `a = 4*antibiotic + 2*ventilation + vasopressors`;
reward -1 on entering a death state (3 or more abnormal vitals), +1 on entering discharge (all vitals normal,
no treatment); episodes of at most 20 steps, undiscounted. Facts from the project's fact sheet
(/work/shared/docs/sepsis-simulator.md, read from OS @ d62995d, OS sim-v2 @ f923f77 and Tang & Wiens'
MLD3/OfflineRL_ModelSelection @ a647686); no code copied.

- `version='v2'` (default): the sim-v2 dynamics; `'original'`: master, with its glucose bug (a non-diabetic's
  glucose "up" fluctuation goes to level 1 from any level).
- The kernel is built exactly from the factorised rules: P(s'|s,a) = K_hr K_sbp K_o2 K_glu 1[flags' = action]
  1[diabetes' = diabetes]; each factor depends on the action, the pre-step treatment flags and diabetes.
  `rules_step` is a plain per-step Python implementation of the same rules (lazy uniform draws, as the
  reference code); `rules_distribution` enumerates its draws exactly, for tests.
- Observations (`observation`): 'obs720' (default; no diabetes), 'obs144' (no diabetes, no glucose),
  'full1440'. A policy over observations is evaluated exactly on the 1440 full states
  (`mdp.observation_policy`).
- The physician (behaviour) policy is the paper's: policy iteration (gamma 0.99) on the full-state MDP in
  which death and discharge are not absorbing, softened to 0.95 on its action and 0.05/7 on each other one.
- Start distributions (`start`): 'os' (the OS prior conditioned on a non-terminal state; diabetes redrawn
  with every rejected draw, so 18.97% diabetic, 74 states) or 'tw606' (Tang & Wiens: diabetes 0.2, uniform
  over the 303 non-terminal states of each block, treatments included).
"""

from __future__ import annotations

import functools
import itertools
from collections.abc import Callable
from typing import Any

import numpy as np

from cleansepsis import mdp
from cleansepsis.mdp import check_choice

ENV_ID = "CleanSepsis/SepsisSim-v0"
N_STATES = 1440  # full states: diabetes x 720
N_OBS_STATES = 720
N_PROJ_STATES = 144
N_ACTIONS = 8
HORIZON = 20
VERSIONS = ("v2", "original")
OBSERVATIONS = ("obs720", "obs144", "full1440")
STARTS = ("os", "tw606")
PHYSICIAN_GAMMA = 0.99
PHYSICIAN_EPSILON = 0.05
P_DIABETES = 0.2
REWARD = "-1 on entering a death state (3+ abnormal vitals), +1 on entering discharge; 20 steps, gamma 1"
ACTION_ENCODING = "4*antibiotic+2*ventilation+vasopressors"
ACTION_NAMES = (
    "none",
    "V",
    "E",
    "EV",
    "A",
    "AV",
    "AE",
    "AEV",
)  # A antibiotics, E ventilation, V vasopressors

LEVELS = {"hr": 3, "sbp": 3, "o2": 2, "glu": 5}
NORMAL = {"hr": 1, "sbp": 1, "o2": 1, "glu": 2}
# OS start prior (State.generate_random_state): per-variable level probabilities
START_HR = (0.25, 0.5, 0.25)
START_SBP = (0.25, 0.5, 0.25)
START_O2 = (0.2, 0.8)
START_GLU = {0: (0.05, 0.15, 0.6, 0.15, 0.05), 1: (0.01, 0.05, 0.15, 0.6, 0.19)}


# ---------------------------------------------------------------------------------------------------------
# State encoding: full = diab*720 + hr*240 + sbp*80 + o2*40 + glu*8 + abx*4 + vaso*2 + vent
# (flag order in the state is abx, vaso, vent; in the action it is abx, vent, vaso)
# ---------------------------------------------------------------------------------------------------------


def encode(diab: int, hr: int, sbp: int, o2: int, glu: int, abx: int, vaso: int, vent: int) -> int:
    return diab * 720 + hr * 240 + sbp * 80 + o2 * 40 + glu * 8 + abx * 4 + vaso * 2 + vent


def decode(index: int) -> tuple[int, int, int, int, int, int, int, int]:
    """(diab, hr, sbp, o2, glu, abx, vaso, vent) of a full state index."""
    diab, rest = divmod(int(index), 720)
    hr, rest = divmod(rest, 240)
    sbp, rest = divmod(rest, 80)
    o2, rest = divmod(rest, 40)
    glu, rest = divmod(rest, 8)
    return diab, hr, sbp, o2, glu, rest >> 2, (rest >> 1) & 1, rest & 1


@functools.cache
def state_table() -> np.ndarray:
    """(1440, 8) int: the variables (diab, hr, sbp, o2, glu, abx, vaso, vent) of every full state."""
    return np.array([decode(i) for i in range(N_STATES)], np.int64)


def action_bits(action: int) -> tuple[int, int, int]:
    """(antibiotic, ventilation, vasopressors) of an action."""
    return (action >> 2) & 1, (action >> 1) & 1, action & 1


def n_abnormal(hr: int, sbp: int, o2: int, glu: int) -> int:
    return int(hr != 1) + int(sbp != 1) + int(o2 != 1) + int(glu != 2)


@functools.cache
def terminal_classes() -> tuple[np.ndarray, np.ndarray]:
    """(death (1440,) bool, discharge (1440,) bool)."""
    s = state_table()
    abnormal = (s[:, 1] != 1).astype(int) + (s[:, 2] != 1) + (s[:, 3] != 1) + (s[:, 4] != 2)
    death = abnormal >= 3
    discharge = (abnormal == 0) & (s[:, 5] == 0) & (s[:, 6] == 0) & (s[:, 7] == 0)
    return death, discharge


def obs_index_of(observation: str) -> tuple[np.ndarray, int]:
    """Observation index per full state and the number of observations."""
    check_choice("observation", observation, OBSERVATIONS)
    full = np.arange(N_STATES)
    if observation == "full1440":
        return full, N_STATES
    if observation == "obs720":
        return full % 720, N_OBS_STATES
    s = state_table()
    return s[:, 1] * 48 + s[:, 2] * 16 + s[:, 3] * 8 + s[:, 5] * 4 + s[:, 6] * 2 + s[:, 7], N_PROJ_STATES


def feature_names(observation: str) -> list[str]:
    """Names of the one-hot observation features (Tang & Wiens' 21-dim order for the full state)."""
    check_choice("observation", observation, OBSERVATIONS)
    blocks = [("hr", 3), ("sbp", 3), ("o2", 2), ("glu", 5), ("abx", 2), ("vaso", 2), ("vent", 2)]
    if observation == "obs144":
        blocks = [b for b in blocks if b[0] != "glu"]
    if observation == "full1440":
        blocks = [("diabetic", 2), *blocks]
    return [f"{name}_{level}" for name, n in blocks for level in range(n)]


def state_vectors(observation: str) -> np.ndarray:
    """(1440, obs_dim) float32 one-hot observation features of every full state."""
    s = state_table()
    columns = {"diabetic": 0, "hr": 1, "sbp": 2, "o2": 3, "glu": 4, "abx": 5, "vaso": 6, "vent": 7}
    names = feature_names(observation)
    out = np.zeros((N_STATES, len(names)), np.float32)
    for j, name in enumerate(names):
        variable, level = name.rsplit("_", 1)
        out[:, j] = s[:, columns[variable]] == int(level)
    return out


# ---------------------------------------------------------------------------------------------------------
# The rules, per step, in plain Python (the reference's order: antibiotics, ventilation, vasopressors,
# fluctuation; each effect draws its own uniform, only when its condition holds)
# ---------------------------------------------------------------------------------------------------------


def rules_step(state: tuple, action: int, uniform: Callable[[], Any], version: str = "v2") -> tuple:
    """The next full state (tuple diab, hr, sbp, o2, glu, abx, vaso, vent) under the simulator's rules."""
    diab, hr, sbp, o2, glu, abx, vaso, vent = state
    give_abx, give_vent, give_vaso = action_bits(action)
    hr_fluctuates = sbp_fluctuates = o2_fluctuates = glu_fluctuates = True
    if give_abx:  # start or continue antibiotics
        if hr == 2 and uniform() < 0.5:
            hr = 1
        if sbp == 2 and uniform() < 0.5:
            sbp = 1
        abx, hr_fluctuates, sbp_fluctuates = 1, False, False
    elif abx:  # withdrawal
        if hr == 1 and uniform() < 0.1:
            hr = 2
        if sbp == 1 and uniform() < 0.1:
            sbp = 2
        abx, hr_fluctuates, sbp_fluctuates = 0, False, False
    if give_vent:
        if o2 == 0 and uniform() < 0.7:
            o2 = 1
        vent, o2_fluctuates = 1, False
    elif vent:
        if o2 == 1 and uniform() < 0.1:
            o2 = 0
        vent, o2_fluctuates = 0, False
    if give_vaso:
        if not diab:
            if sbp in (0, 1) and uniform() < 0.7:
                sbp += 1
        else:
            if sbp == 1:
                if uniform() < 0.9:
                    sbp = 2
            elif sbp == 0:
                u = uniform()
                if u < 0.5:
                    sbp = 1
                elif u < 0.9:
                    sbp = 2
            if uniform() < 0.5:
                glu = min(4, glu + 1)
        vaso, sbp_fluctuates, glu_fluctuates = 1, False, False
    elif vaso:  # withdrawal: sbp may fall; glucose still fluctuates
        if uniform() < (0.05 if diab else 0.1):
            sbp = max(0, sbp - 1)
        vaso, sbp_fluctuates = 0, False
    if hr_fluctuates:
        hr = _fluctuate(hr, uniform(), 0.1, 0.2, 2)
    if sbp_fluctuates:
        sbp = _fluctuate(sbp, uniform(), 0.1, 0.2, 2)
    if o2_fluctuates:
        o2 = _fluctuate(o2, uniform(), 0.1, 0.2, 1)
    if glu_fluctuates:
        u = uniform()
        if diab:
            glu = _fluctuate(glu, u, 0.3, 0.6, 4)
        elif u < 0.1:
            glu = max(0, glu - 1)
        elif u < 0.2:
            glu = min(1 if version == "original" else 4, glu + 1)  # master's bug caps the rise at level 1
    return diab, hr, sbp, o2, glu, abx, vaso, vent


def _fluctuate(level: int, u, down: float, up: float, top: int) -> int:
    if u < down:
        return max(0, level - 1)
    if u < up:
        return min(top, level + 1)
    return level


def rules_start(uniform: Callable[[], float]) -> tuple:
    """A start state by the OS rejection loop: draw diabetes and the vitals, no treatment, until the state is
    neither death nor discharge (diabetes is redrawn on every try)."""

    def categorical(probs):
        u, total = uniform(), 0.0
        for level, p in enumerate(probs):
            total += p
            if u < total:
                return level
        return len(probs) - 1

    while True:
        diab = int(uniform() < P_DIABETES)
        hr, sbp, o2 = categorical(START_HR), categorical(START_SBP), categorical(START_O2)
        glu = categorical(START_GLU[diab])
        k = n_abnormal(hr, sbp, o2, glu)
        if 0 < k < 3:
            return diab, hr, sbp, o2, glu, 0, 0, 0


def rules_is_terminal(state: tuple) -> bool:
    _, hr, sbp, o2, glu, abx, vaso, vent = state
    k = n_abnormal(hr, sbp, o2, glu)
    return k >= 3 or (k == 0 and abx == 0 and vaso == 0 and vent == 0)


def rules_reward(state: tuple) -> float:
    _, hr, sbp, o2, glu, abx, vaso, vent = state
    k = n_abnormal(hr, sbp, o2, glu)
    return -1.0 if k >= 3 else (1.0 if k == 0 and abx == 0 and vaso == 0 and vent == 0 else 0.0)


class _Interval:
    """A uniform draw known only to lie in [lo, hi); comparisons split the interval (see rules_distribution)."""

    def __init__(self, walker: _Walker):
        self.lo, self.hi, self.walker = 0.0, 1.0, walker

    def __lt__(self, threshold: float) -> bool:
        if threshold <= self.lo:
            return False
        if threshold >= self.hi:
            return True
        below = self.walker.decide()
        if below:
            self.hi = threshold
        else:
            self.lo = threshold
        return below


class _Walker:
    """Depth-first walk over the branch decisions of one `rules_step` call."""

    def __init__(self):
        self.script: list[bool] = []
        self.position = 0
        self.draws: list[_Interval] = []

    def uniform(self) -> _Interval:
        draw = _Interval(self)
        self.draws.append(draw)
        return draw

    def decide(self) -> bool:
        if self.position == len(self.script):
            self.script.append(True)
        choice = self.script[self.position]
        self.position += 1
        return choice

    def next_script(self) -> bool:
        while self.script and not self.script[-1]:
            self.script.pop()
        if not self.script:
            return False
        self.script[-1] = False
        return True


def rules_distribution(state: tuple, action: int, version: str = "v2") -> dict[tuple, float]:
    """The exact next-state distribution of `rules_step` from `state` under `action`: every path of its
    uniform draws is followed once (each draw an interval split by the thresholds it is compared with)."""
    walker = _Walker()
    out: dict[tuple, float] = {}
    while True:
        walker.position, walker.draws = 0, []
        nxt = rules_step(state, action, walker.uniform, version)
        probability = 1.0
        for draw in walker.draws:
            probability *= draw.hi - draw.lo
        out[nxt] = out.get(nxt, 0.0) + probability
        del walker.script[walker.position :]
        if not walker.next_script():
            return out


# ---------------------------------------------------------------------------------------------------------
# The exact kernel from the factorised rules
# ---------------------------------------------------------------------------------------------------------

F3 = np.array([[0.9, 0.1, 0.0], [0.1, 0.8, 0.1], [0.0, 0.1, 0.9]])  # hr/sbp fluctuation
ABX_ON = np.array([[1.0, 0, 0], [0, 1.0, 0], [0, 0.5, 0.5]])
ABX_OFF = np.array([[1.0, 0, 0], [0, 0.9, 0.1], [0, 0, 1.0]])
VASO_ON = {
    0: np.array([[0.3, 0.7, 0], [0, 0.3, 0.7], [0, 0, 1.0]]),
    1: np.array([[0.1, 0.5, 0.4], [0, 0.1, 0.9], [0, 0, 1.0]]),
}
VASO_OFF = {
    0: np.array([[1.0, 0, 0], [0.1, 0.9, 0], [0, 0.1, 0.9]]),
    1: np.array([[1.0, 0, 0], [0.05, 0.95, 0], [0, 0.05, 0.95]]),
}
VENT_ON = np.array([[0.3, 0.7], [0.0, 1.0]])
VENT_OFF = np.array([[1.0, 0.0], [0.1, 0.9]])
O2_FLUCTUATION = np.array([[0.9, 0.1], [0.1, 0.9]])


def _glucose_fluctuation(diab: int, version: str) -> np.ndarray:
    down, up = (0.3, 0.3) if diab else (0.1, 0.1)
    k = np.zeros((5, 5))
    for level in range(5):
        k[level, max(0, level - 1)] += down
        top = 1 if (version == "original" and not diab) else 4
        k[level, min(top, level + 1)] += up
        k[level, level] += 1.0 - down - up
    return k


def factor_kernels(action: int, abx0: int, vaso0: int, vent0: int, diab: int, version: str = "v2") -> dict:
    """The four per-vital kernels {hr (3,3), sbp (3,3), o2 (2,2), glu (5,5)} (rows: from level) of one step,
    given the action, the pre-step treatment flags and diabetes."""
    check_choice("version", version, VERSIONS)
    give_abx, give_vent, give_vaso = action_bits(action)
    eye3 = np.eye(3)
    abx_stage = ABX_ON if give_abx else (ABX_OFF if abx0 else eye3)
    hr = abx_stage if (give_abx or abx0) else F3
    vaso_stage = VASO_ON[diab] if give_vaso else (VASO_OFF[diab] if vaso0 else eye3)
    sbp_fluctuates = not (give_abx or abx0 or give_vaso or vaso0)
    sbp = abx_stage @ vaso_stage @ (F3 if sbp_fluctuates else eye3)
    o2 = VENT_ON if give_vent else (VENT_OFF if vent0 else O2_FLUCTUATION)
    if give_vaso:
        glu = np.eye(5)
        if diab:
            glu = 0.5 * np.eye(5) + 0.5 * np.eye(5, k=1)
            glu[4, 4] = 1.0
    else:
        glu = _glucose_fluctuation(diab, version)
    return {"hr": hr, "sbp": sbp, "o2": o2, "glu": glu}


@functools.cache
def transition_matrix(version: str = "v2") -> np.ndarray:
    """Exact float64 (1440, 8, 1440) kernel of the simulator (read-only), from the factor kernels."""
    check_choice("version", version, VERSIONS)
    tx = np.zeros((N_STATES, N_ACTIONS, N_STATES))
    vitals = np.arange(90)  # hr*30 + sbp*10 + o2*5 + glu, i.e. the index bits above the flags
    for diab, abx0, vaso0, vent0, action in itertools.product(
        (0, 1), (0, 1), (0, 1), (0, 1), range(N_ACTIONS)
    ):
        k = factor_kernels(action, abx0, vaso0, vent0, diab, version)
        joint = np.kron(np.kron(np.kron(k["hr"], k["sbp"]), k["o2"]), k["glu"])  # (90, 90)
        give_abx, give_vent, give_vaso = action_bits(action)
        rows = diab * 720 + vitals * 8 + abx0 * 4 + vaso0 * 2 + vent0
        cols = diab * 720 + vitals * 8 + give_abx * 4 + give_vaso * 2 + give_vent
        tx[rows[:, None], action, cols[None, :]] = joint
    tx.flags.writeable = False
    return tx


@functools.cache
def reward_next() -> np.ndarray:
    death, discharge = terminal_classes()
    return discharge.astype(np.float64) - death


# ---------------------------------------------------------------------------------------------------------
# Start distributions
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def start_distribution(start: str = "os") -> np.ndarray:
    """(1440,) float64 start distribution: 'os' (OS prior conditioned on a non-terminal state, diabetes
    redrawn on each rejection) or 'tw606' (diabetes 0.2, uniform over the non-terminal states of a block)."""
    check_choice("start", start, STARTS)
    s = state_table()
    death, discharge = terminal_classes()
    live = ~(death | discharge)
    if start == "tw606":
        weight = np.where(s[:, 0] == 1, P_DIABETES, 1 - P_DIABETES) * live
        per_block = live[:720].sum()
        return weight / per_block
    untreated = (s[:, 5] == 0) & (s[:, 6] == 0) & (s[:, 7] == 0)
    glu_prior = np.where(s[:, 0] == 1, np.take(START_GLU[1], s[:, 4]), np.take(START_GLU[0], s[:, 4]))
    prior = (
        np.where(s[:, 0] == 1, P_DIABETES, 1 - P_DIABETES)
        * np.take(START_HR, s[:, 1])
        * np.take(START_SBP, s[:, 2])
        * np.take(START_O2, s[:, 3])
        * glu_prior
        * untreated
        * live
    )
    return prior / prior.sum()


# ---------------------------------------------------------------------------------------------------------
# The physician policy (OS plots-main-paper.ipynb cells 8-10)
# ---------------------------------------------------------------------------------------------------------


def _argmax_lowest(q: np.ndarray, tol: float = 1e-10) -> np.ndarray:
    """Argmax per row, ties within `tol` going to the lowest action index (numpy argmax on exact ties)."""
    return np.argmax(q >= q.max(1, keepdims=True) - tol, axis=1)


@functools.cache
def physician_actions(version: str = "v2") -> np.ndarray:
    """(1440,) the physician's action in every full state: policy iteration (exact evaluation, gamma 0.99)
    on the non-absorbing full-state MDP (death and discharge keep transitioning and pay on every entry),
    starting from the greedy policy on the expected immediate reward (pymdptoolbox's start)."""
    tx = transition_matrix(version)
    r = tx @ reward_next()  # (1440, 8) expected immediate reward
    action = _argmax_lowest(r)
    rows = np.arange(N_STATES)
    for _ in range(100):
        p_pi = tx[rows, action]
        values = mdp.solve64(np.eye(N_STATES) - PHYSICIAN_GAMMA * p_pi, r[rows, action])
        new = _argmax_lowest(r + PHYSICIAN_GAMMA * tx @ values)
        if np.array_equal(new, action):
            break
        action = new
    action.flags.writeable = False
    return action


def physician_policy(version: str = "v2", soft: bool = True) -> np.ndarray:
    """(1440, 8) float64: 0.95 on the physician's action and 0.05/7 on each other one (soft), or one-hot."""
    hard = np.eye(N_ACTIONS)[physician_actions(version)]
    if not soft:
        return hard
    return hard * (1 - PHYSICIAN_EPSILON) + (1 - hard) * PHYSICIAN_EPSILON / (N_ACTIONS - 1)


# ---------------------------------------------------------------------------------------------------------
# Params
# ---------------------------------------------------------------------------------------------------------


@functools.cache
def _device_tx(version: str):
    """The float32 kernel on the device, shared by every observation/start variant of a version."""
    import jax.numpy as jnp

    return jnp.asarray(transition_matrix(version), jnp.float32)


@functools.cache
def _tables(version: str, start: str) -> dict[str, Any]:
    """The alias tables on the device, shared by every observation/obs_mode variant of a version and start."""
    import jax.numpy as jnp

    tables = mdp.numpy_tables(transition_matrix(version), start_distribution(start))
    return {name: jnp.asarray(table) for name, table in tables.items()}


def load_params(
    version: str = "v2",
    observation: str = "obs720",
    start: str = "os",
    obs_mode: str = "vector",
    max_steps: int = HORIZON,
) -> mdp.MDPParams:
    """The simulator as MDPParams over the 1440 full states (cached). Exact evaluation is by backward
    induction over `max_steps` (20) steps, gamma 1. `state_vectors`/`obs_index` are the chosen observation
    of each full state; `clinician_probs` is the soft physician policy."""
    check_choice("version", version, VERSIONS)
    check_choice("observation", observation, OBSERVATIONS)
    check_choice("start", start, STARTS)
    check_choice("obs_mode", obs_mode, mdp.OBS_MODES)
    if int(max_steps) < 1:
        raise ValueError(f"max_steps must be at least 1, got {max_steps}")
    return _load_params(version, observation, start, obs_mode, int(max_steps))


@functools.cache
def _load_params(version: str, observation: str, start: str, obs_mode: str, max_steps: int) -> mdp.MDPParams:
    death, discharge = terminal_classes()
    obs_index, n_obs = obs_index_of(observation)
    return mdp.make_params(
        tx=_device_tx(version),
        start_dist=start_distribution(start),
        reward_next=reward_next(),
        terminal=death | discharge,
        admissible_mask=np.ones((N_STATES, N_ACTIONS), bool),
        state_vectors=state_vectors(observation),
        obs_index=obs_index,
        n_obs=n_obs,
        clinician_probs=physician_policy(version),
        max_steps=max_steps,
        finite_horizon=True,
        spec=("sepsis-sim", version, observation, start, max_steps),
        obs_mode=obs_mode,
        tables=_tables(version, start),
    )


@functools.cache
def _reference_table(version: str, start: str, horizon: int) -> tuple:
    death, discharge = terminal_classes()
    table = mdp.np_reference_table(
        transition_matrix(version),
        start_distribution(start),
        reward_next(),
        death | discharge,
        np.ones((N_STATES, N_ACTIONS), bool),
        physician_policy(version),
        horizon=horizon,
    )
    return tuple((name, row["expected_return"], row["mean_length"]) for name, row in table.items())


def reference_values(params: mdp.MDPParams) -> dict[str, dict[str, float]]:
    """Float64 exact return (20 steps, gamma 1) and mean length of: random, clinician (= the soft physician;
    clinician_renormalised is the same, all actions being admissible), greedy_clinician (the hard physician)
    and optimal (the time-dependent 20-step optimum on the full state, an upper bound for every policy)."""
    _, version, _, start, horizon = params.spec
    return {
        name: {"expected_return": r, "mean_length": n}
        for name, r, n in _reference_table(version, start, horizon)
    }


def tang_wiens_optimum(version: str = "v2", start: str = "tw606", gamma: float = 0.99) -> float:
    """V* of Tang & Wiens' formulation (1442 states: the terminal classes lead to absorbing states with the
    +-1 reward one step after entering them; gamma 0.99; no horizon) from a start distribution; 0.6775418
    for v2 and their uniform start over 606 states (TW 1-ground-truth-policy.ipynb cell 18)."""
    tx = transition_matrix(version)
    death, discharge = terminal_classes()
    live = ~(death | discharge)
    live_index = np.flatnonzero(live)
    # the value of entering a terminal class is its delayed reward: the absorbing transition pays it
    entry = discharge.astype(np.float64) - death
    values = np.zeros(N_STATES)
    action = np.zeros(N_STATES, np.int64)
    for _ in range(100):
        p_pi = tx[live_index, action[live_index]][:, live_index]
        rhs = gamma * (tx[live_index, action[live_index]] @ entry)
        values[live_index] = mdp.solve64(np.eye(live_index.size) - gamma * p_pi, rhs)
        q = gamma * tx @ (entry + live * values)
        new = np.where(live, np.argmax(q, axis=1), 0)
        gain = q[np.arange(N_STATES), new] - q[np.arange(N_STATES), action]
        if not (gain[live] > 1e-13).any():
            break
        action = np.where(gain > 1e-13, new, action)
    return float(start_distribution(start)[live] @ values[live])


# ---------------------------------------------------------------------------------------------------------
# Plain per-step Python simulator (the speed baseline and distribution tests)
# ---------------------------------------------------------------------------------------------------------


def python_rollout_steps(n_steps: int, seed: int = 0, version: str = "v2") -> tuple[int, float]:
    """Step the plain-Python rules `n_steps` times with uniform random actions, starting a new episode
    (OS rejection start) after a terminal state or 20 steps; returns (episodes finished, total reward).
    The draws use Python's `random.Random`, the quickest uniform source in pure Python."""
    import random

    rng = random.Random(seed)
    uniform = rng.random
    state, t, episodes, total = rules_start(uniform), 0, 0, 0.0
    for _ in range(n_steps):
        state = rules_step(state, rng.randrange(N_ACTIONS), uniform, version)
        t += 1
        reward = rules_reward(state)
        total += reward
        if reward != 0.0 or t >= HORIZON:
            state, t, episodes = rules_start(uniform), 0, episodes + 1
    return episodes, total


class SepsisSimEnv(mdp.FiniteMDPEnv):
    """The simulator as a Gymnasium env (numpy RNG over the exact kernel's alias tables). Actions
    Discrete(8) `4*antibiotic + 2*ventilation + vasopressors`; observations per `observation` and
    `obs_mode`; episodes of at most 20 steps. `info["state_index"]` is the full state (it reveals
    diabetes: a learner must not use it)."""

    def __init__(
        self,
        version: str = "v2",
        observation: str = "obs720",
        start: str = "os",
        obs_mode: str = "vector",
        max_steps: int = HORIZON,
    ):
        super().__init__(load_params(version, observation, start, obs_mode, max_steps))
