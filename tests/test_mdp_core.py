"""The same core checks for the three MDPs: ICU-Sepsis, the Oberst-Sontag simulator and a cohort MDP."""

import dataclasses

import gymnasium
import jax
import numpy as np
import pytest

from cleansepsis import cohort_mdp as C
from cleansepsis import env as E
from cleansepsis import mdp
from cleansepsis import sepsis_sim as S

MDPS = ("icu-sepsis", "sepsis-sim", "cohort")


@pytest.fixture(scope="module")
def cohort_dir(tmp_path_factory):
    """A cohort MDP rebuilt from 4,100 ICU-Sepsis clinician episodes (state index as the cluster): over 4,096
    episodes, so that the rollout runs in the same 8,192 envs, one compiled program, as the module's
    20,000-episode ICU-Sepsis rollout."""
    from cleansepsis.icu_replay import make_clinician_replay
    from cleansepsis.replay import write_replay

    folder = tmp_path_factory.mktemp("core")
    write_replay(folder / "icu.parquet", *make_clinician_replay(4100, seed=2))
    C.build_cohort_mdp(
        C.CohortMdpArgs(replay=folder / "icu.parquet", out=folder / "mdp", cluster="state-index", threshold=2)
    )
    return folder / "mdp"


@pytest.fixture(scope="module")
def all_params(cohort_dir):
    return {"icu-sepsis": E.load_params(), "sepsis-sim": S.load_params(), "cohort": C.load_params(cohort_dir)}


@pytest.mark.parametrize("name", MDPS)
def test_rows_are_distributions_and_the_alias_tables_sample_them(name, all_params):
    params = jax.device_get(all_params[name])
    n_states = params.tx.shape[0]
    for first in range(0, n_states, 64):  # 64 states at a time: all of ICU-Sepsis at once took 0.7 GB
        tx = np.asarray(params.tx[first : first + 64], np.float64)
        np.testing.assert_allclose(tx.sum(-1), 1.0, atol=1e-5)
        sampled = mdp.alias_probabilities(
            params.alias_threshold[first : first + 64].reshape(-1, params.alias_threshold.shape[-1]),
            params.alias_next[first : first + 64].reshape(-1, params.alias_next.shape[-1]),
            n_states,
        )
        np.testing.assert_allclose(sampled.reshape(tx.shape), tx, atol=2e-6)
    start = mdp.alias_probabilities(
        np.asarray(params.start_threshold)[None], np.asarray(params.start_next)[None], n_states
    )[0]
    np.testing.assert_allclose(start, np.asarray(params.start_dist), atol=2e-6)


@pytest.mark.parametrize("name", MDPS)
def test_terminal_states_absorb_and_rewards_come_on_entering_them(name, all_params):
    params = all_params[name]
    terminal = np.asarray(params.terminal)
    assert terminal.any() and (np.asarray(params.start_dist)[terminal] == 0).all()
    assert (np.asarray(params.reward_next)[~terminal] == 0).all()
    state = mdp.EnvState(state_index=np.int32(np.flatnonzero(terminal)[0]), time=np.int32(0))
    keys = jax.random.split(jax.random.key(0), 64)
    _, stepped, reward, terminated, _ = jax.vmap(mdp.step, in_axes=(0, None, None, None))(
        keys, state, 0, params
    )
    assert (np.asarray(stepped.state_index) == int(state.state_index)).all() and not np.asarray(reward).any()
    assert np.asarray(terminated).all()


@pytest.mark.parametrize("name", MDPS)
def test_exact_values_agree_with_monte_carlo(name, all_params):
    """20,000 clinician episodes: mean return and length within 4 standard errors of the exact values."""
    params = all_params[name]
    policy = mdp.clinician_policy(params)
    exact_return, exact_length = (float(x) for x in jax.jit(mdp.policy_evaluation)(policy, params))
    returns, lengths = mdp.episode_summaries(mdp.rollout_episodes(jax.random.key(9), policy, params, 20_000))
    for sample, exact in ((returns, exact_return), (lengths, exact_length)):
        assert abs(sample.mean() - exact) < 4 * sample.std(ddof=1) / np.sqrt(sample.size), (name, exact)


@pytest.mark.parametrize("name", MDPS)
def test_gymnasium_check_env_and_make(name, all_params, cohort_dir):
    from gymnasium.utils.env_checker import check_env

    params = all_params[name]
    for mode in mdp.OBS_MODES:
        check_env(mdp.FiniteMDPEnv(dataclasses.replace(params, obs_mode=mode)), skip_render_check=True)
    env_id, kwargs = {
        "icu-sepsis": (E.ENV_ID, {}),
        "sepsis-sim": (S.ENV_ID, {"observation": "obs144"}),
        "cohort": (C.ENV_ID, {"path": cohort_dir}),
    }[name]
    env = gymnasium.make(env_id, **kwargs)
    obs, info = env.reset(seed=0)
    assert env.observation_space.contains(obs) and "state_index" in info
    done, steps = False, 0
    while not done:
        obs, _, terminated, truncated, info = env.step(info["admissible_actions"][0])
        done, steps = terminated or truncated, steps + 1
    assert steps <= int(params.max_steps)


def _pooled_chisquare_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Chi-square p-value of counts against probabilities, cells expecting fewer than 5 pooled."""
    chisquare = pytest.importorskip("scipy.stats").chisquare
    assert counts[probs == 0].sum() == 0  # never a zero-probability outcome
    expected = probs * counts.sum()
    keep = expected >= 5
    observed = np.append(counts[keep], counts[~keep].sum())
    wanted = np.append(expected[keep], expected[~keep].sum())
    ok = wanted > 0
    return float(chisquare(observed[ok], wanted[ok] * observed[ok].sum() / wanted[ok].sum()).pvalue)


@pytest.mark.parametrize("name", MDPS)
def test_batched_step_draws_transitions_and_resets_from_the_exact_distributions(name, all_params):
    """step_autoreset_batch takes one word per transition and one per reset (batch_words): 20,000 envs
    in one state, stepped once, against the kernel row; and, at the time limit, their resets against
    the start distribution."""
    params = all_params[name]
    n = 20_000
    terminal = np.asarray(params.terminal)
    live = np.flatnonzero(~terminal)
    s = int(live[len(live) // 2])
    a = int(np.flatnonzero(np.asarray(params.admissible_mask)[s])[-1])
    step = jax.jit(mdp.step_autoreset_batch)
    actions = np.full(n, a, np.int32)
    fresh = mdp.EnvState(state_index=np.full(n, s, np.int32), time=np.zeros(n, np.int32))
    _, _, _, _, _, info = step(jax.random.key(5), fresh, actions, params)
    counts = np.bincount(np.asarray(info["next_state_index"]), minlength=params.n_states)
    assert _pooled_chisquare_pvalue(counts, np.asarray(params.tx, np.float64)[s, a]) > 1e-4
    last = mdp.EnvState(
        state_index=np.full(n, s, np.int32), time=np.full(n, int(params.max_steps) - 1, np.int32)
    )
    _, new_state, _, terminated, truncated, _ = step(jax.random.key(6), last, actions, params)
    assert bool(np.all(np.asarray(terminated) | np.asarray(truncated)))
    assert np.all(np.asarray(new_state.time) == 0)
    counts = np.bincount(np.asarray(new_state.state_index), minlength=params.n_states)
    assert _pooled_chisquare_pvalue(counts, np.asarray(params.start_dist, np.float64)) > 1e-4
    again = step(jax.random.key(6), last, actions, params)[1].state_index
    np.testing.assert_array_equal(np.asarray(again), np.asarray(new_state.state_index))


def test_one_word_alias_draw_covers_every_slot_and_both_branches_exactly():
    """`_word_slot_uniform` over all 2^32 words, counted exactly by bisection on its monotone quotient:
    each slot gets 1/width of the words (to width / 2^32 relative) and the share of a slot's words below a
    threshold is the threshold (to 2^-23 or width / 2^32), for the widths of the three MDPs' tables."""
    for width in (3, 54, 74, 213, 712):
        slots = np.arange(width, dtype=np.uint64)
        # words of slot k: k + width * q for q = 0..q_max(k)
        q_max = (np.uint64(2**32 - 1) - slots) // np.uint64(width)
        words_of_slot = q_max.astype(np.float64) + 1
        np.testing.assert_allclose(words_of_slot / 2**32, 1.0 / width, rtol=width * 2.0**-32)
        draw = jax.jit(lambda w, width=width: mdp._word_slot_uniform(w, width))
        for threshold in (0.0, 1e-6, 0.1, 0.5, 0.7, 0.999, 1.0):
            lo, hi = np.zeros(width, np.int64), q_max.astype(np.int64) + 1  # first q with uniform >= t
            for _ in range(34):
                mid = (lo + hi) // 2
                word = (slots.astype(np.int64) + width * np.minimum(mid, q_max.astype(np.int64))).astype(
                    np.uint32
                )
                got_slot, uniform = (np.asarray(x) for x in draw(word))
                assert np.array_equal(got_slot, slots.astype(np.int32))
                below = (uniform < np.float32(threshold)) & (mid <= q_max.astype(np.int64))
                lo, hi = np.where(below, mid + 1, lo), np.where(below, hi, mid)
            # resolution: the quotient's step width / 2^32, or float32's rounding, whichever is coarser
            np.testing.assert_allclose(lo / words_of_slot, threshold, atol=max(2.0**-23, width * 2.0**-32))
