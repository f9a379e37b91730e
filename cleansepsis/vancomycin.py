"""A vancomycin dosing simulator with known truth: population pharmacokinetics in pure JAX.

Each episode is one simulated ICU patient on a 4-day vancomycin course, with a dosing decision every 12 h
(`N_DECISIONS` = 8). The action is the dose in mg, in [0, `DOSE_MAX_MG`], infused at 1 g/h (at least 1 h).

Pharmacokinetics (Goti et al. 2018, Ther Drug Monit 40:212-221, Table 2 as encoded in nlmixr2lib's
`Goti_2018_vancomycin`; numbers in ../shared/docs/vancomycin.md), two compartments:
    CL = 4.5 (CrCL / 120)^0.8 0.7^DIAL L/h      Vc = 58.4 (WT / 70) 0.5^DIAL L
    Vp = 38.4 (WT / 70) L                          Q  = 6.5 L/h
with log-normal between-subject variability (CV 39.8% on CL, 81.6% on Vc, 57.1% on Vp) and residual
error 3.4 mg/L additive plus 22.7% proportional on every drawn level. CrCL is Cockcroft-Gault, capped at
150 mL/min, with serum creatinine below 1 mg/dL set to 1 above age 60. The two-compartment equations are
solved exactly (closed-form 2x2 matrix exponential), so concentrations and AUCs carry no integration error.

Modelling choices (not from a published model; each is a field of `VancoParams`):
- the population of covariates (age, weight, sex, baseline creatinine, dialysis);
- kidney injury: in each 12 h interval an AKI event occurs with probability 1 - exp(-h), where the hazard
  h = `aki_rate_per_day` * 0.5 * (AUC24 / 600)^`aki_power` grows steeply with exposure (Zasowski et al. 2018:
  AUC24 >= 677 mg*h/L carried 3-4-fold risk). An event multiplies the kidney function by
  `aki_gfr_factor`; creatinine rises in proportion (a steady-state reading of the creatinine balance), and
  Cockcroft-Gault feeds it back into CL. Patients on dialysis get no AKI. `aki_rate_per_day = 0` turns the
  feedback off;
- when levels are drawn: at each decision from 24 h on, with probability `level_draw_prob`;
- the reward (below).

Reward of interval k, from the exposure over the last 24 h (AUC24; the first interval counts twice):
    1 inside the Rybak et al. 2020 target 400-600 mg*h/L; below it 1 - (400 - AUC24) / 200, at least -1;
    above it 1 - (AUC24 - 600) / 100, at least -2; minus `aki_penalty` for an AKI event in the interval.
So a return lies in [-8 (2 + aki_penalty), 8], that is [-40, 8] at the defaults.

What a clinician sees (the observation, `OBS_FEATURES`): age, weight, sex, dialysis, today's measured
creatinine and its Cockcroft-Gault clearance, the admission creatinine, time, doses given, the last dose and
the time since, the last measured level and the time since it was drawn. Never the PK parameters.

    params = VancoParams()
    obs, state = reset(key, params)
    obs, state, reward, terminated, info = step(key, state, dose_mg, params)
    value, stderr = policy_value(key, params, clinician_policy, n_patients=100_000)

Policies are pure functions `policy(key, obs, state, params) -> (dose_mg, log_density)`. Only the oracle
reads the hidden `state`; every other policy must act on `obs` alone. `log_density` is the log of the
behaviour density in mg^-1 (0 for deterministic policies).

For research on dosing methods only: this is not a validated dosing tool.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import equinox as eqx
import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr, ndtri

DECISION_HOURS = 12.0
N_DECISIONS = 8
DOSE_MAX_MG = 3000.0
INFUSION_MG_PER_HOUR = 1000.0
MIN_INFUSION_HOURS = 1.0
AUC_TARGET = (400.0, 600.0)
NO_LEVEL_HOURS = 999.0  # "hours since the last level" before any level, so the feature stays finite
OBS_FEATURES = (
    ("age", "years"),
    ("weight", "kg"),
    ("female", "0/1"),
    ("dialysis", "0/1"),
    ("creatinine", "mg/dL"),
    ("crcl_cockcroft_gault", "mL/min"),
    ("admission_creatinine", "mg/dL"),
    ("hours_since_start", "h"),
    ("doses_given", "count"),
    ("last_dose", "mg"),
    ("hours_since_last_dose", "h"),
    ("total_dose", "mg"),
    ("last_level", "mg/L"),
    ("hours_since_last_level", "h"),
)
OBS_DIM = len(OBS_FEATURES)
OBS_HIGH = 1e5  # above every feature's reach (total dose at most 8 x 3,000 mg)


class VancoParams(eqx.Module):
    """Everything that defines the simulator; all floats, so variants can be vmapped.

    Goti 2018's typical values and variability are the defaults; the population and AKI fields are
    modelling choices (see the module docstring)."""

    cl_typical: float = 4.5  # L/h at CrCL 120 mL/min
    cl_crcl_exponent: float = 0.8
    cl_dialysis_factor: float = 0.7
    vc_typical: float = 58.4  # L at 70 kg
    vc_dialysis_factor: float = 0.5
    vp_typical: float = 38.4  # L at 70 kg
    q_typical: float = 6.5  # L/h
    cv_cl: float = 0.398
    cv_vc: float = 0.816
    cv_vp: float = 0.571
    residual_additive: float = 3.4  # mg/L
    residual_proportional: float = 0.227
    crcl_cap: float = 150.0  # mL/min
    # population (modelling choice): an adult ICU case mix
    age_mean: float = 62.0
    age_sd: float = 16.0
    weight_median: float = 80.0
    weight_log_sd: float = 0.25
    female_prob: float = 0.42
    creatinine_median: float = 1.0
    creatinine_log_sd: float = 0.45
    dialysis_prob: float = 0.10
    creatinine_lab_cv: float = 0.05
    # kidney injury (modelling choice)
    aki_rate_per_day: float = 0.05
    aki_power: float = 5.0
    aki_gfr_factor: float = 0.6
    aki_penalty: float = 3.0
    level_draw_prob: float = 0.5


class PatientState(eqx.Module):
    """One patient's hidden and observed state (every leaf a scalar array)."""

    age: jax.Array
    weight: jax.Array
    female: jax.Array
    dialysis: jax.Array
    creatinine_base: jax.Array  # true baseline serum creatinine, mg/dL
    eta_cl: jax.Array
    eta_vc: jax.Array
    eta_vp: jax.Array
    kidney: jax.Array  # kidney function relative to baseline (1 = intact)
    amount_central: jax.Array  # mg
    amount_peripheral: jax.Array  # mg
    previous_auc: jax.Array  # AUC of the previous 12 h interval, mg*h/L
    decision: jax.Array  # int32, 0..N_DECISIONS
    doses_given: jax.Array
    last_dose: jax.Array
    hours_since_last_dose: jax.Array
    total_dose: jax.Array
    measured_creatinine: jax.Array
    admission_creatinine: jax.Array
    last_level: jax.Array
    hours_since_last_level: jax.Array


class PK(NamedTuple):
    cl: jax.Array
    vc: jax.Array
    vp: jax.Array
    q: jax.Array


# ---------------------------------------------------------------------------------------------------------
# Pharmacokinetics
# ---------------------------------------------------------------------------------------------------------


def cockcroft_gault(age, weight, female, creatinine, cap: float = 150.0) -> jax.Array:
    """Creatinine clearance in mL/min; creatinine below 1 mg/dL counts as 1 above age 60 (Goti 2018)."""
    scr = jnp.where(age > 60.0, jnp.maximum(creatinine, 1.0), creatinine)
    crcl = (140.0 - age) * weight / (72.0 * scr) * jnp.where(female > 0.5, 0.85, 1.0)
    return jnp.clip(crcl, 1.0, cap)


def true_creatinine(state: PatientState) -> jax.Array:
    return state.creatinine_base / state.kidney


def pk_parameters(state: PatientState, params: VancoParams) -> PK:
    """The patient's CL, Vc, Vp, Q at its current kidney function."""
    crcl = cockcroft_gault(state.age, state.weight, state.female, true_creatinine(state), params.crcl_cap)
    dial = state.dialysis
    cl = params.cl_typical * (crcl / 120.0) ** params.cl_crcl_exponent * params.cl_dialysis_factor**dial
    vc = params.vc_typical * (state.weight / 70.0) * params.vc_dialysis_factor**dial
    vp = params.vp_typical * (state.weight / 70.0)
    return PK(cl * jnp.exp(state.eta_cl), vc * jnp.exp(state.eta_vc), vp * jnp.exp(state.eta_vp),
              jnp.asarray(params.q_typical, jnp.float32))


def _rate_matrix(pk: PK) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Entries (a, b, c, d) of K in d(Ac, Ap)/dt = K (Ac, Ap) + (rate, 0)."""
    k10, k12, k21 = pk.cl / pk.vc, pk.q / pk.vc, pk.q / pk.vp
    return -(k10 + k12), k21, k12, -k21


def advance(amounts: jax.Array, rate: jax.Array, hours: jax.Array, pk: PK) -> tuple[jax.Array, jax.Array]:
    """Exact two-compartment solution over `hours` at a constant infusion `rate` (mg/h).

    Returns the amounts (Ac, Ap) at the end and the integral of the central concentration (mg*h/L)."""
    a, b, c, d = _rate_matrix(pk)
    trace, det = a + d, a * d - b * c
    disc = jnp.sqrt(trace * trace - 4.0 * det)  # > 0: (a - d)^2 + 4bc with b, c > 0
    lam_fast = 0.5 * (trace - disc)
    lam_slow = det / lam_fast  # the product of the roots; avoids cancellation in (trace + disc) / 2
    e_fast, e_slow = jnp.exp(lam_fast * hours), jnp.exp(lam_slow * hours)
    # exp(K t) = [e_slow (K - lam_fast I) - e_fast (K - lam_slow I)] / (lam_slow - lam_fast)
    denom = lam_slow - lam_fast
    m11 = (e_slow * (a - lam_fast) - e_fast * (a - lam_slow)) / denom
    m12 = (e_slow - e_fast) * b / denom
    m21 = (e_slow - e_fast) * c / denom
    m22 = (e_slow * (d - lam_fast) - e_fast * (d - lam_slow)) / denom
    # steady state of the infusion: x* = -K^{-1} u, with K^{-1} = [[d, -b], [-c, a]] / det
    star_c, star_p = -d * rate / det, c * rate / det
    y_c, y_p = amounts[0] - star_c, amounts[1] - star_p
    end_c = m11 * y_c + m12 * y_p + star_c
    end_p = m21 * y_c + m22 * y_p + star_p
    # integral of x: K^{-1} (x(t) - x(0) - u t); only its central row is needed
    dx_c, dx_p = end_c - amounts[0] - rate * hours, end_p - amounts[1]
    integral_c = (d * dx_c - b * dx_p) / det
    return jnp.stack([end_c, end_p]), integral_c / pk.vc


def infusion_hours(dose: jax.Array) -> jax.Array:
    return jnp.maximum(dose / INFUSION_MG_PER_HOUR, MIN_INFUSION_HOURS)


def dose_interval(amounts: jax.Array, dose: jax.Array, pk: PK) -> tuple[jax.Array, jax.Array]:
    """One 12 h interval starting with an infusion of `dose` mg: end amounts and the interval's AUC."""
    t_inf = infusion_hours(dose)
    during, auc_during = advance(amounts, dose / t_inf, t_inf, pk)
    after, auc_after = advance(during, jnp.zeros_like(dose), DECISION_HOURS - t_inf, pk)
    return after, auc_during + auc_after


def target_reward(auc24: jax.Array) -> jax.Array:
    low, high = AUC_TARGET
    below = jnp.maximum(1.0 - (low - auc24) / 200.0, -1.0)
    above = jnp.maximum(1.0 - (auc24 - high) / 100.0, -2.0)
    return jnp.where(auc24 < low, below, jnp.where(auc24 > high, above, 1.0))


# ---------------------------------------------------------------------------------------------------------
# The environment: reset and step
# ---------------------------------------------------------------------------------------------------------


def _lognormal_eta(key: jax.Array, cv: float) -> jax.Array:
    return jax.random.normal(key) * jnp.sqrt(jnp.log1p(cv * cv))


def observe(state: PatientState, params: VancoParams) -> jax.Array:
    crcl = cockcroft_gault(state.age, state.weight, state.female, state.measured_creatinine, params.crcl_cap)
    return jnp.stack([
        state.age, state.weight, state.female, state.dialysis, state.measured_creatinine, crcl,
        state.admission_creatinine, state.decision * DECISION_HOURS, state.doses_given, state.last_dose,
        state.hours_since_last_dose, state.total_dose, state.last_level, state.hours_since_last_level,
    ]).astype(jnp.float32)


def _measure_creatinine(key: jax.Array, true_value: jax.Array, params: VancoParams) -> jax.Array:
    return true_value * jnp.exp(params.creatinine_lab_cv * jax.random.normal(key))


def reset(key: jax.Array, params: VancoParams) -> tuple[jax.Array, PatientState]:
    """Draw a patient from the population; no drug given yet."""
    k = jax.random.split(key, 10)
    age = jnp.clip(params.age_mean + params.age_sd * jax.random.normal(k[0]), 18.0, 95.0)
    weight = jnp.clip(params.weight_median * jnp.exp(params.weight_log_sd * jax.random.normal(k[1])), 40.0, 200.0)
    female = jax.random.bernoulli(k[2], params.female_prob).astype(jnp.float32)
    creatinine = jnp.clip(
        params.creatinine_median * jnp.exp(params.creatinine_log_sd * jax.random.normal(k[3])), 0.4, 8.0
    )
    dialysis = jax.random.bernoulli(k[4], params.dialysis_prob).astype(jnp.float32)
    measured = _measure_creatinine(k[8], creatinine, params)
    zero = jnp.zeros((), jnp.float32)
    state = PatientState(
        age=age, weight=weight, female=female, dialysis=dialysis, creatinine_base=creatinine,
        eta_cl=_lognormal_eta(k[5], params.cv_cl), eta_vc=_lognormal_eta(k[6], params.cv_vc),
        eta_vp=_lognormal_eta(k[7], params.cv_vp), kidney=jnp.ones((), jnp.float32),
        amount_central=zero, amount_peripheral=zero, previous_auc=zero,
        decision=jnp.zeros((), jnp.int32), doses_given=zero, last_dose=zero,
        hours_since_last_dose=zero, total_dose=zero, measured_creatinine=measured,
        admission_creatinine=measured, last_level=zero,
        hours_since_last_level=jnp.asarray(NO_LEVEL_HOURS, jnp.float32),
    )
    return observe(state, params), state


class StepInfo(NamedTuple):
    auc24: jax.Array  # exposure over the last 24 h, mg*h/L
    aki: jax.Array  # 1.0 when an AKI event happened in this interval
    concentration: jax.Array  # true central concentration at the end of the interval, mg/L
    level_drawn: jax.Array  # 1.0 when a level was drawn at the end of the interval


def step(key: jax.Array, state: PatientState, dose: jax.Array, params: VancoParams):
    """Give `dose` mg now and advance 12 h. Returns (obs, state, reward, terminated, info).

    Episodes end (terminated) after `N_DECISIONS` decisions; stepping a finished episode is the caller's
    error and is not checked inside jit."""
    k_aki, k_draw, k_noise_prop, k_noise_add, k_creat = jax.random.split(key, 5)
    dose = jnp.clip(jnp.asarray(dose, jnp.float32), 0.0, DOSE_MAX_MG)
    pk = pk_parameters(state, params)
    amounts = jnp.stack([state.amount_central, state.amount_peripheral])
    amounts, auc = dose_interval(amounts, dose, pk)
    auc24 = auc + jnp.where(state.decision == 0, auc, state.previous_auc)
    hazard = params.aki_rate_per_day * (DECISION_HOURS / 24.0) * (auc24 / 600.0) ** params.aki_power
    hazard = jnp.where(state.dialysis > 0.5, 0.0, hazard)
    aki = jax.random.uniform(k_aki) < -jnp.expm1(-hazard)
    kidney = jnp.where(aki, state.kidney * params.aki_gfr_factor, state.kidney)
    reward = target_reward(auc24) - params.aki_penalty * aki

    concentration = amounts[0] / pk.vc
    decision = state.decision + 1
    drawn = (decision >= 2) & jax.random.bernoulli(k_draw, params.level_draw_prob)
    level = concentration * (1.0 + params.residual_proportional * jax.random.normal(k_noise_prop))
    level = jnp.maximum(level + params.residual_additive * jax.random.normal(k_noise_add), 0.0)
    gave = dose > 0.0
    new_state = eqx.tree_at(
        lambda s: (s.kidney, s.amount_central, s.amount_peripheral, s.previous_auc, s.decision, s.doses_given,
                   s.last_dose, s.hours_since_last_dose, s.total_dose, s.measured_creatinine, s.last_level,
                   s.hours_since_last_level),
        state,
        (
            kidney, amounts[0], amounts[1], auc, decision, state.doses_given + gave,
            jnp.where(gave, dose, state.last_dose),
            jnp.where(gave, DECISION_HOURS, state.hours_since_last_dose + DECISION_HOURS),
            state.total_dose + dose,
            _measure_creatinine(k_creat, state.creatinine_base / kidney, params),
            jnp.where(drawn, level, state.last_level),
            jnp.where(drawn, 0.0, jnp.minimum(state.hours_since_last_level + DECISION_HOURS, NO_LEVEL_HOURS)),
        ),
    )
    terminated = decision >= N_DECISIONS
    info = StepInfo(auc24, aki.astype(jnp.float32), concentration, drawn.astype(jnp.float32))
    return observe(new_state, params), new_state, reward.astype(jnp.float32), terminated, info


# ---------------------------------------------------------------------------------------------------------
# Reference policies
# ---------------------------------------------------------------------------------------------------------

Policy = Callable[[jax.Array, jax.Array, PatientState, VancoParams], tuple[jax.Array, jax.Array]]
CLINICIAN_LOG_SD = 0.2  # spread of the clinician's dose around its rule, on the log scale


def clinician_rule_dose(obs: jax.Array) -> jax.Array:
    """The clinician's intended dose (mg) before noise: weight-based loading and maintenance, scaled by
    kidney function and adjusted to the last measured level (a common ward protocol, not a guideline).

    - first dose: 25 mg/kg (loading);
    - then 15 mg/kg every 12 h times clip(CrCL / 100, 0.25, 1.25), or times 0.3 on dialysis;
    - a level below 10 mg/L raises the dose by 25%; 20-25 mg/L lowers it by 25%; above 25 halves it.
    """
    f = {name: obs[i] for i, (name, _) in enumerate(OBS_FEATURES)}
    renal = jnp.where(f["dialysis"] > 0.5, 0.3, jnp.clip(f["crcl_cockcroft_gault"] / 100.0, 0.25, 1.25))
    maintenance = 15.0 * f["weight"] * renal
    has_level = f["hours_since_last_level"] < NO_LEVEL_HOURS
    level = f["last_level"]
    adjust = jnp.where(level < 10.0, 1.25, jnp.where(level > 25.0, 0.5, jnp.where(level > 20.0, 0.75, 1.0)))
    maintenance = maintenance * jnp.where(has_level, adjust, 1.0)
    return jnp.where(f["doses_given"] < 1, 25.0 * f["weight"], maintenance)


def clinician_policy(key: jax.Array, obs: jax.Array, state: PatientState, params: VancoParams):
    """The behaviour policy: log-normal around the rule (log-sd 0.2), truncated to (0, DOSE_MAX_MG].

    Drawn by the inverse CDF of the truncated normal on the log scale, so the density is exact."""
    del state, params
    mu = jnp.log(jnp.clip(clinician_rule_dose(obs), 1.0, DOSE_MAX_MG))
    upper = ndtr((jnp.log(DOSE_MAX_MG) - mu) / CLINICIAN_LOG_SD)
    u = jax.random.uniform(key, minval=1e-7, maxval=1.0) * upper
    z = ndtri(u)
    dose = jnp.exp(mu + CLINICIAN_LOG_SD * z)
    return jnp.minimum(dose, DOSE_MAX_MG), clinician_log_density(obs, dose)


def clinician_log_density(obs: jax.Array, dose: jax.Array) -> jax.Array:
    """Log density (per mg) of `dose` under `clinician_policy` at `obs`; -inf outside (0, DOSE_MAX_MG]."""
    mu = jnp.log(jnp.clip(clinician_rule_dose(obs), 1.0, DOSE_MAX_MG))
    safe = jnp.clip(dose, 1e-6, DOSE_MAX_MG)
    z = (jnp.log(safe) - mu) / CLINICIAN_LOG_SD
    upper = ndtr((jnp.log(DOSE_MAX_MG) - mu) / CLINICIAN_LOG_SD)
    logpdf = -0.5 * z * z - jnp.log(CLINICIAN_LOG_SD * safe * jnp.sqrt(2.0 * jnp.pi)) - jnp.log(upper)
    return jnp.where((dose > 0.0) & (dose <= DOSE_MAX_MG), logpdf, -jnp.inf)


def oracle_policy(key: jax.Array, obs: jax.Array, state: PatientState, params: VancoParams):
    """An upper reference that knows the patient's PK: the dose whose 12 h AUC is 250 mg*h/L, so that
    every AUC24 sits at 500, the middle of the target (found by bisection; AUC rises with dose).

    It ignores the AKI risk at that exposure and the noise, so it is a strong reference, not the optimum."""
    del key, obs
    pk = pk_parameters(state, params)
    amounts = jnp.stack([state.amount_central, state.amount_peripheral])
    goal = 0.5 * (AUC_TARGET[0] + AUC_TARGET[1]) / 2.0

    def body(_, bounds):
        low, high = bounds
        mid = 0.5 * (low + high)
        too_much = dose_interval(amounts, mid, pk)[1] > goal
        return jnp.where(too_much, low, mid), jnp.where(too_much, mid, high)

    low, high = jax.lax.fori_loop(0, 40, body, (jnp.float32(0.0), jnp.float32(DOSE_MAX_MG)))
    return 0.5 * (low + high), jnp.zeros((), jnp.float32)


def fixed_dose_policy(dose_mg: float) -> Policy:
    def policy(key, obs, state, params):
        del key, obs, state, params
        return jnp.float32(dose_mg), jnp.zeros((), jnp.float32)

    return policy


# ---------------------------------------------------------------------------------------------------------
# Rollouts and true values
# ---------------------------------------------------------------------------------------------------------


# A policy that carries a memory from one decision to the next (for example the episode's previous steps):
# (key, obs, state, params, memory) -> (dose, log density, next memory).
MemoryPolicy = Callable[[jax.Array, jax.Array, PatientState, VancoParams, Any], tuple[jax.Array, jax.Array, Any]]


def rollout_with_memory(
    key: jax.Array, params: VancoParams, policy: MemoryPolicy, memory: Any, n_patients: int
) -> dict[str, jax.Array]:
    """`rollout` for a policy with memory; `memory` is its value at every patient's first decision. The same
    key gives the same patients (and, for a policy that ignores its memory, the same records) as `rollout`."""

    def one_patient(k):
        k_reset, k_run = jax.random.split(k)
        obs, state = reset(k_reset, params)

        def body(carry, k_step):
            obs, state, memory = carry
            k_act, k_env = jax.random.split(k_step)
            dose, log_density, memory = policy(k_act, obs, state, params, memory)
            next_obs, next_state, reward, terminated, info = step(k_env, state, dose, params)
            record = {
                "obs": obs, "dose": jnp.clip(dose, 0.0, DOSE_MAX_MG), "log_density": log_density,
                "reward": reward, "next_obs": next_obs, "terminated": terminated, **info._asdict(),
            }
            return (next_obs, next_state, memory), record

        _, records = jax.lax.scan(body, (obs, state, memory), jax.random.split(k_run, N_DECISIONS))
        return records

    return jax.vmap(one_patient)(jax.random.split(key, n_patients))


def rollout(key: jax.Array, params: VancoParams, policy: Policy, n_patients: int) -> dict[str, jax.Array]:
    """`n_patients` episodes of `N_DECISIONS` steps under `policy`, every array (n_patients, N_DECISIONS, ...).

    Keys: obs, dose, log_density, reward, next_obs, terminated, auc24, aki, level_drawn, concentration."""

    def without_memory(k, obs, state, params, memory):
        return (*policy(k, obs, state, params), memory)

    return rollout_with_memory(key, params, without_memory, (), n_patients)


# One compiled program per (policy, patient count), shared by every caller.
rollout_jit = jax.jit(rollout, static_argnames=("policy", "n_patients"))


def policy_value(
    key: jax.Array, params: VancoParams, policy: Policy, n_patients: int = 100_000, chunk: int = 25_000
) -> tuple[float, float]:
    """Monte Carlo value (mean undiscounted return) over `n_patients` and its standard error.

    Run in chunks of `chunk` patients so memory stays flat; the chunks' keys are split from `key`."""
    return monte_carlo_value(key, lambda k, size: rollout_jit(k, params, policy, size)["reward"], n_patients, chunk)


def monte_carlo_value(
    key: jax.Array, rewards_of: Callable[[jax.Array, int], jax.Array], n_patients: int, chunk: int = 25_000
) -> tuple[float, float]:
    """`policy_value` for any rollout: `rewards_of(key, size)` gives (size, N_DECISIONS) rewards of `size`
    patients (a policy with memory: `rollout_with_memory`), on the patients `policy_value` draws from `key`."""
    if n_patients < 2:
        raise ValueError(f"n_patients must be at least 2, got {n_patients}")
    n_chunks = -(-n_patients // chunk)
    parts = []
    for i, k in enumerate(jax.random.split(key, n_chunks)):
        size = min(chunk, n_patients - i * chunk)
        parts.append(rewards_of(k, size).sum(-1))
    returns = jnp.concatenate(parts).astype(jnp.float64 if jax.config.jax_enable_x64 else jnp.float32)
    mean = float(returns.mean())
    stderr = float(returns.std(ddof=1) / jnp.sqrt(returns.shape[0]))
    return mean, stderr


def summarize_rollout(records: dict[str, Any]) -> dict[str, float]:
    """Clinically readable outcome rates of a rollout (means over patients and decisions)."""
    auc = records["auc24"]
    low, high = AUC_TARGET
    return {
        "return": float(records["reward"].sum(-1).mean()),
        "auc24_in_target": float(((auc >= low) & (auc <= high)).mean()),
        "auc24_above_600": float((auc > high).mean()),
        "auc24_below_400": float((auc < low).mean()),
        "aki_per_patient": float(records["aki"].sum(-1).mean()),
        "mean_dose_mg": float(records["dose"].mean()),
    }


# ---------------------------------------------------------------------------------------------------------
# Gymnasium class
# ---------------------------------------------------------------------------------------------------------

ENV_ID = "CleanSepsis/Vancomycin-v0"


class VancomycinEnv(gymnasium.Env):
    """The simulator as a Gymnasium env over the same jitted `reset` and `step` (one patient per episode).

    Action: Box([0], [DOSE_MAX_MG]) in mg. Observation: Box(OBS_DIM) of `OBS_FEATURES`. `info` carries the
    interval's AUC24, AKI event, true end concentration and whether a level was drawn; the true PK is never
    shown. The keys come from the env's `np_random`, so `reset(seed=...)` makes episodes reproducible."""

    metadata: dict[str, Any] = {"render_modes": []}  # noqa: RUF012

    def __init__(self, params: VancoParams | None = None):
        self.params = params if params is not None else VancoParams()
        self.action_space = gymnasium.spaces.Box(0.0, DOSE_MAX_MG, (1,), np.float32)
        self.observation_space = gymnasium.spaces.Box(0.0, OBS_HIGH, (OBS_DIM,), np.float32)
        self._reset = jax.jit(reset)
        self._step = jax.jit(step)
        self._state: PatientState | None = None

    def _key(self) -> jax.Array:
        return jax.random.PRNGKey(int(self.np_random.integers(2**31 - 1)))

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        obs, self._state = self._reset(self._key(), self.params)
        return np.asarray(obs), {}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if int(self._state.decision) >= N_DECISIONS:
            raise RuntimeError("the episode has ended; call reset()")
        dose = float(np.asarray(action, np.float64).reshape(-1)[0])
        if not np.isfinite(dose):
            raise ValueError(f"dose must be finite, got {dose}")
        obs, self._state, reward, terminated, info = self._step(self._key(), self._state, dose, self.params)
        info = {name: float(value) for name, value in info._asdict().items()}
        return np.asarray(obs), float(reward), bool(terminated), False, info


def register() -> None:
    """Register ENV_ID with Gymnasium (idempotent)."""
    if ENV_ID not in gymnasium.registry:
        gymnasium.register(id=ENV_ID, entry_point="cleansepsis.vancomycin:VancomycinEnv")


register()
