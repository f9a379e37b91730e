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
    """A cohort MDP rebuilt from 1,000 ICU-Sepsis clinician episodes (state index as the cluster)."""
    from cleansepsis.icu_replay import make_clinician_replay
    from cleansepsis.replay import write_replay

    folder = tmp_path_factory.mktemp("core")
    write_replay(folder / "icu.parquet", *make_clinician_replay(1000, seed=2))
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
    tx = np.asarray(params.tx, np.float64)
    np.testing.assert_allclose(tx.sum(-1), 1.0, atol=1e-5)
    n_states, n_actions, _ = tx.shape
    sampled = mdp.alias_probabilities(
        np.asarray(params.alias_threshold).reshape(n_states * n_actions, -1),
        np.asarray(params.alias_next).reshape(n_states * n_actions, -1),
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
