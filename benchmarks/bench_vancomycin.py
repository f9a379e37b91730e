"""Speed of the vancomycin simulator: patient-steps per second of the vmapped JAX rollout (clinician policy,
one compiled program) against a plain per-step Python loop over the same rules, measured in the same run.

    uv run python benchmarks/bench_vancomycin.py [--patients 1000000] [--python-patients 300]

The Python loop reuses `vancomycin.step` and the policy eagerly would measure dispatch, not the rules, so
it is a line-by-line numpy transcription of one step (the same equations, float64), checked against the
JAX step on the first patients before timing.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis import vancomycin as V


def _python_interval(amounts, dose, cl, vc, vp, q):
    k10, k12, k21 = cl / vc, q / vc, q / vp
    a, b, c, d = -(k10 + k12), k21, k12, -k21
    det = a * d - b * c

    def advance(x, rate, hours):
        lam_fast = 0.5 * (a + d - math.sqrt((a + d) ** 2 - 4 * det))
        lam_slow = det / lam_fast
        ef, es = math.exp(lam_fast * hours), math.exp(lam_slow * hours)
        den = lam_slow - lam_fast
        m = [[(es * (a - lam_fast) - ef * (a - lam_slow)) / den, (es - ef) * b / den],
             [(es - ef) * c / den, (es * (d - lam_fast) - ef * (d - lam_slow)) / den]]
        sc, sp = -d * rate / det, c * rate / det
        yc, yp = x[0] - sc, x[1] - sp
        end = [m[0][0] * yc + m[0][1] * yp + sc, m[1][0] * yc + m[1][1] * yp + sp]
        integral = (d * (end[0] - x[0] - rate * hours) - b * (end[1] - x[1])) / det
        return end, integral / vc

    t_inf = max(dose / V.INFUSION_MG_PER_HOUR, V.MIN_INFUSION_HOURS)
    mid, auc1 = advance(amounts, dose / t_inf, t_inf)
    end, auc2 = advance(mid, 0.0, V.DECISION_HOURS - t_inf)
    return end, auc1 + auc2


def python_rollout(patients: list[dict], rng: np.random.Generator, p: V.VancoParams) -> float:
    """Episodes of the clinician rule (noise from numpy) with AKI feedback; returns the mean return."""
    total = 0.0
    for pt in patients:
        x, kidney, prev_auc, doses, last_level, since_level, ret = [0.0, 0.0], 1.0, 0.0, 0, 0.0, V.NO_LEVEL_HOURS, 0.0
        measured = pt["creatinine"] * math.exp(p.creatinine_lab_cv * rng.standard_normal())
        for k in range(V.N_DECISIONS):
            scr = pt["creatinine"] / kidney
            scr_cg = max(scr, 1.0) if pt["age"] > 60 else scr
            crcl = min(max((140 - pt["age"]) * pt["weight"] / (72 * scr_cg) * (0.85 if pt["female"] else 1.0), 1.0), 150.0)
            cl = p.cl_typical * (crcl / 120) ** p.cl_crcl_exponent * p.cl_dialysis_factor ** pt["dialysis"] * pt["e_cl"]
            vc = p.vc_typical * pt["weight"] / 70 * p.vc_dialysis_factor ** pt["dialysis"] * pt["e_vc"]
            vp = p.vp_typical * pt["weight"] / 70 * pt["e_vp"]
            m_scr = measured if pt["age"] <= 60 else max(measured, 1.0)
            m_crcl = (140 - pt["age"]) * pt["weight"] / (72 * m_scr) * (0.85 if pt["female"] else 1.0)
            m_crcl = min(max(m_crcl, 1.0), 150.0)
            renal = 0.3 if pt["dialysis"] else min(max(m_crcl / 100, 0.25), 1.25)
            rule = 25 * pt["weight"] if doses == 0 else 15 * pt["weight"] * renal
            if doses and since_level < V.NO_LEVEL_HOURS:
                rule *= 1.25 if last_level < 10 else 0.5 if last_level > 25 else 0.75 if last_level > 20 else 1.0
            dose = min(rule * math.exp(V.CLINICIAN_LOG_SD * rng.standard_normal()), V.DOSE_MAX_MG)
            x, auc = _python_interval(x, dose, cl, vc, vp, p.q_typical)
            auc24 = auc + (auc if k == 0 else prev_auc)
            hazard = 0.0 if pt["dialysis"] else p.aki_rate_per_day * 0.5 * (auc24 / 600) ** p.aki_power
            aki = rng.random() < -math.expm1(-hazard)
            kidney *= p.aki_gfr_factor if aki else 1.0
            low, high = V.AUC_TARGET
            r = 1.0 if low <= auc24 <= high else (max(1 - (low - auc24) / 200, -1) if auc24 < low else max(1 - (auc24 - high) / 100, -2))
            ret += r - p.aki_penalty * aki
            prev_auc, doses = auc, doses + 1
            measured = pt["creatinine"] / kidney * math.exp(p.creatinine_lab_cv * rng.standard_normal())
            if k + 1 >= 2 and rng.random() < p.level_draw_prob:
                conc = x[0] / vc
                last_level = max(conc * (1 + p.residual_proportional * rng.standard_normal())
                                 + p.residual_additive * rng.standard_normal(), 0.0)
                since_level = 0.0
        total += ret
    return total / len(patients)


def check_interval_against_jax(p: V.VancoParams) -> float:
    """Largest relative difference of the transcription's interval AUC from the JAX one, 20 patients."""
    worst = 0.0
    for seed in range(20):
        state = V.reset(jax.random.PRNGKey(seed), p)[1]
        pk = V.pk_parameters(state, p)
        for dose in (0.0, 800.0, 2600.0):
            start = [150.0, 60.0]
            _, auc_jax = V.dose_interval(jnp.asarray(start, jnp.float32), jnp.float32(dose), pk)
            _, auc_py = _python_interval(start, dose, *(float(v) for v in pk))
            worst = max(worst, abs(float(auc_jax) - auc_py) / max(abs(auc_py), 1e-9))
    return worst


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=1_000_000)
    parser.add_argument("--python-patients", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    a = parser.parse_args()
    p = V.VancoParams()
    print(f"transcription vs JAX interval AUC: max relative difference {check_interval_against_jax(p):.1e}")

    chunk = min(a.patients, 250_000)
    n_chunks = -(-a.patients // chunk)
    fn = jax.jit(lambda k: V.rollout(k, p, V.clinician_policy, chunk)["reward"].sum(-1).mean())
    t0 = time.perf_counter()
    fn(jax.random.PRNGKey(0)).block_until_ready()
    compile_s = time.perf_counter() - t0
    jax_rates = []
    for r in range(a.repeats):
        t0 = time.perf_counter()
        for i in range(n_chunks):
            fn(jax.random.PRNGKey(100 * r + i)).block_until_ready()
        jax_rates.append(n_chunks * chunk * V.N_DECISIONS / (time.perf_counter() - t0))

    rng = np.random.default_rng(0)
    patients = []
    for _ in range(a.python_patients):
        patients.append({
            "age": float(np.clip(p.age_mean + p.age_sd * rng.standard_normal(), 18, 95)),
            "weight": float(np.clip(p.weight_median * math.exp(p.weight_log_sd * rng.standard_normal()), 40, 200)),
            "female": bool(rng.random() < p.female_prob), "dialysis": int(rng.random() < p.dialysis_prob),
            "creatinine": float(np.clip(p.creatinine_median * math.exp(p.creatinine_log_sd * rng.standard_normal()), 0.4, 8)),
            **{f"e_{n}": math.exp(rng.standard_normal() * math.sqrt(math.log1p(cv * cv)))
               for n, cv in (("cl", p.cv_cl), ("vc", p.cv_vc), ("vp", p.cv_vp))},
        })
    t0 = time.perf_counter()
    python_value = python_rollout(patients, rng, p)
    python_rate = len(patients) * V.N_DECISIONS / (time.perf_counter() - t0)

    load = os.getloadavg()[0]
    jax_rate = float(np.median(jax_rates))
    print(f"load average {load:.2f}; JAX compile {compile_s:.1f} s")
    print("| implementation | patient-steps/s | ratio |")
    print("|---|---|---|")
    print(f"| JAX, vmapped over {chunk:,} patients, median of {a.repeats} | {jax_rate:,.0f} | {jax_rate / python_rate:,.0f}x |")
    print(f"| plain Python, per step ({len(patients)} patients; mean return {python_value:.2f}) | {python_rate:,.0f} | 1x |")
    print(f"goal >= 1,000,000 patient-steps/s: {'met' if jax_rate >= 1e6 else 'not met'}")


if __name__ == "__main__":
    main()
