"""The JAX ICU-Sepsis env: exact values against the published figures, sampler, determinism, Gymnasium."""

import gymnasium
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleansepsis import env as E

# Published reference figures (docs/icu-sepsis facts sheet, computed from the icu-sepsis 2.0.1 arrays).
FACTS_MEAN = {
    "random": (0.780071, 9.462),
    "clinician": (0.781845, 9.238),
    "clinician_renormalised": (0.782014, 9.223),
    "greedy_clinician": (0.786826, None),
    "optimal": (0.875142, 10.992),
}
FACTS_TERMINATE = {
    "random": 0.008360,
    "clinician": 0.415809,
    "clinician_renormalised": 0.782014,
    "optimal": 0.875142,
}


_vmapped_step = jax.jit(jax.vmap(E.step, in_axes=(0, None, None, None)))


@jax.jit
def _draw_next(keys, state, action, params):
    return _vmapped_step(keys, state, action, params)[1].state_index


@pytest.fixture(scope="module")
def params():
    return E.load_params()


@pytest.fixture(scope="module")
def params_terminate():
    return E.load_params("terminate")


@pytest.fixture(scope="module")
def optimal(params):
    """The optimal policy from the jitted value iteration (one compile for the module)."""
    q, _ = jax.jit(E.value_iteration)(params)
    return E.greedy_admissible(q, params.admissible_mask)


def test_reference_values_match_facts_sheet(params, params_terminate):
    table = E.reference_values(params)
    for name, (expected_return, mean_length) in FACTS_MEAN.items():
        assert table[name]["expected_return"] == pytest.approx(expected_return, abs=1e-5 + 5e-7), name
        if mean_length is not None:
            assert table[name]["mean_length"] == pytest.approx(mean_length, abs=5e-4), name
    table = E.reference_values(params_terminate)
    for name, expected_return in FACTS_TERMINATE.items():
        assert table[name]["expected_return"] == pytest.approx(expected_return, abs=1e-5 + 5e-7), name


def test_float32_jitted_evaluation_agrees(params, params_terminate, optimal):
    """The jittable float32 path (value iteration, batched policy evaluation) agrees to 1e-4."""
    evaluate = jax.jit(E.policy_evaluation)
    for p, facts in ((params, {k: v[0] for k, v in FACTS_MEAN.items()}), (params_terminate, FACTS_TERMINATE)):
        policies = {
            "random": E.random_policy(p),
            "clinician": E.clinician_policy(p, renormalise=False),
            "clinician_renormalised": E.clinician_policy(p),
            "optimal": optimal,  # admissible actions only, so optimal under both strategies
        }
        returns, lengths = evaluate(jnp.stack(list(policies.values())), p)  # one batched call
        assert returns.shape == lengths.shape == (len(policies),)
        for name, expected_return in zip(policies, returns, strict=True):
            assert float(expected_return) == pytest.approx(facts[name], abs=1e-4), (p.strategy, name)
    single_return, single_length = evaluate(E.clinician_policy(params), params)
    np.testing.assert_allclose(single_return, E.reference_values(params)["clinician_renormalised"]["expected_return"],
                               atol=1e-4)
    np.testing.assert_allclose(single_length, 9.223, atol=1e-3)


def test_value_iteration_q_is_consistent(params, optimal):
    q, v = jax.jit(E.value_iteration)(params)
    np.testing.assert_array_equal(E.greedy_admissible(q, params.admissible_mask), optimal)
    assert float(params.start_dist @ v) == pytest.approx(FACTS_MEAN["optimal"][0], abs=1e-4)
    np.testing.assert_array_equal(np.asarray(v)[list(E.TERMINAL_STATES)], 0.0)
    # Bellman: q(s, a) = P(survive next) + sum_s' P(s' | s, a) v(s') for patient states
    tx = E.shipped_arrays()["tx_mat"]
    bellman = tx[:, :, E.SURVIVAL] + tx @ np.asarray(v, np.float64)
    np.testing.assert_allclose(np.asarray(q)[: E.N_PATIENT_STATES], bellman[: E.N_PATIENT_STATES], atol=1e-5)


def test_greedy_admissible_never_picks_inadmissible(params):
    q = jax.random.normal(jax.random.key(0), (3, E.N_STATES, E.N_ACTIONS))
    policy = E.greedy_admissible(q, params.admissible_mask)
    assert policy.shape == (3, E.N_STATES, E.N_ACTIONS)
    np.testing.assert_array_equal(policy.sum(-1), 1.0)
    assert not bool(jnp.any((policy > 0) & ~params.admissible_mask))


def test_unknown_options_raise():
    with pytest.raises(ValueError, match="'bogus'"):
        E.load_params(strategy="bogus")
    with pytest.raises(ValueError, match="'pixels'"):
        E.load_params(obs_mode="pixels")


@pytest.mark.parametrize("strategy", ["mean", "terminate"])
def test_monte_carlo_agrees_with_exact_values(strategy, optimal):
    """100,000 episodes per policy: mean return and length within 3 standard errors of the exact values."""
    params = E.load_params(strategy)
    exact = E.reference_values(params)
    policies = {
        "random": E.random_policy(params),
        "clinician": E.clinician_policy(params, renormalise=False),
        "optimal": optimal,
    }
    for seed, (name, policy) in enumerate(policies.items()):
        rollout = E.rollout_episodes(jax.random.key(100 + seed), policy, params, 100_000)
        returns, lengths = E.episode_summaries(rollout)
        assert returns.size == 100_000
        for sample, key in ((returns, "expected_return"), (lengths, "mean_length")):
            standard_error = sample.std(ddof=1) / np.sqrt(sample.size)
            assert abs(sample.mean() - exact[name][key]) < 3 * standard_error, (strategy, name, key)


def test_sampler_matches_shipped_transitions(params):
    """Chi-square goodness of fit of 200,000 next-state draws against tx_mat, for a few (state, action)."""
    scipy_stats = pytest.importorskip("scipy.stats")
    tx = E.shipped_arrays()["tx_mat"]
    width_per_pair = (tx > 0).sum(-1)
    widest = np.unravel_index(np.argmax(width_per_pair[: E.N_PATIENT_STATES]), width_per_pair.shape)
    pairs = [(0, 0), (100, 12), (int(widest[0]), int(widest[1])), (712, 24)]
    n = 200_000
    keys = jax.random.split(jax.random.key(7), n)
    for state_index, action in pairs:
        state = E.EnvState(state_index=jnp.int32(state_index), time=jnp.int32(0))
        counts = np.bincount(np.asarray(_draw_next(keys, state, action, params)), minlength=E.N_STATES)
        expected = tx[state_index, action] * n
        assert counts[expected == 0].sum() == 0, (state_index, action)
        # Pool the rare next states so that every bin expects at least 5 draws.
        rare = (expected > 0) & (expected < 5)
        observed = np.append(counts[expected >= 5], counts[rare].sum())
        wanted = np.append(expected[expected >= 5], expected[rare].sum())
        keep = wanted > 0
        p_value = scipy_stats.chisquare(observed[keep], wanted[keep] * observed.sum() / wanted[keep].sum()).pvalue
        assert p_value > 1e-4, (state_index, action, p_value)


def test_terminate_strategy_sends_inadmissible_actions_to_death(params_terminate):
    mask = np.asarray(params_terminate.admissible_mask)
    state_index = int(np.flatnonzero(~mask[: E.N_PATIENT_STATES].all(1))[0])
    action = int(np.flatnonzero(~mask[state_index])[0])
    state = E.EnvState(state_index=jnp.int32(state_index), time=jnp.int32(0))
    keys = jax.random.split(jax.random.key(0), 64)
    _, next_state, reward, terminated, _ = _vmapped_step(keys, state, action, params_terminate)
    assert bool(jnp.all(next_state.state_index == E.DEATH)) and bool(jnp.all(terminated))
    assert float(reward.sum()) == 0.0


def test_vmap_over_keys_equals_python_loop(params):
    keys = jax.random.split(jax.random.key(3), 16)
    state = E.EnvState(state_index=jnp.int32(5), time=jnp.int32(0))
    batched = _vmapped_step(keys, state, 3, params)
    single = jax.jit(E.step)
    for i, key in enumerate(keys):
        for got, want in zip(jax.tree.leaves(batched), jax.tree.leaves(single(key, state, 3, params)), strict=True):
            np.testing.assert_array_equal(got[i], want)
    assert len(set(np.asarray(batched[1].state_index).tolist())) > 1  # different keys, different draws


def test_same_key_same_trajectory(params):
    def trajectory(key):
        key, reset_key = jax.random.split(key)
        _, state = E.reset(reset_key, params)
        states = [int(state.state_index)]
        for step_key in jax.random.split(key, 20):
            _, state, *_ = _vmapped_step(step_key[None], state, 0, params)
            state = jax.tree.map(lambda x: x[0], state)
            states.append(int(state.state_index))
        return states

    assert trajectory(jax.random.key(11)) == trajectory(jax.random.key(11))
    assert trajectory(jax.random.key(11)) != trajectory(jax.random.key(12))


def test_observation_modes():
    for mode, shape, dtype in (("vector", (E.OBS_DIM,), jnp.float32), ("onehot", (E.N_STATES,), jnp.float32),
                               ("index", (), jnp.int32)):
        p = E.load_params(obs_mode=mode)
        obs, state = E.reset(jax.random.key(0), p)
        assert obs.shape == shape and obs.dtype == dtype, mode
        if mode == "vector":
            np.testing.assert_array_equal(obs, p.state_vectors[state.state_index])
    p = E.load_params()
    np.testing.assert_array_equal(E.observe(jnp.int32(E.SURVIVAL), p), np.zeros(E.OBS_DIM))


def test_step_autoreset_resets_after_terminal(params):
    state = E.EnvState(state_index=jnp.int32(0), time=jnp.int32(3))
    keys = jax.random.split(jax.random.key(1), 2000)
    out = jax.jit(jax.vmap(E.step_autoreset, in_axes=(0, None, None, None)))(keys, state, 0, params)
    _, new_state, reward, terminated, _, info = out
    ended = np.asarray(terminated)
    assert ended.any() and (~ended).any()
    assert not bool(jnp.any(params.terminal[new_state.state_index]))  # always a live state afterwards
    np.testing.assert_array_equal(np.asarray(new_state.time)[ended], 0)
    np.testing.assert_array_equal(np.asarray(new_state.time)[~ended], 4)
    np.testing.assert_array_equal(np.asarray(info["episode_length"]), 4)
    np.testing.assert_array_equal(np.asarray(reward), np.asarray(info["next_state_index"]) == E.SURVIVAL)


def test_truncation_at_max_steps_and_vmap_over_params():
    """Params are a pytree: a stack of two variants (max_steps 2 and 500) vmaps like any batch."""
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), E.load_params(max_steps=2), E.load_params())
    state = E.EnvState(state_index=jnp.int32(0), time=jnp.int32(1))
    keys = jax.random.split(jax.random.key(0), 100)
    over_params = jax.vmap(_vmapped_step, in_axes=(None, None, None, 0))
    _, next_state, _, terminated, truncated = jax.jit(over_params)(keys, state, 0, stacked)
    np.testing.assert_array_equal(np.asarray(truncated[0]), ~np.asarray(terminated[0]))  # cut at step 2
    assert not bool(truncated[1].any())
    np.testing.assert_array_equal(next_state.state_index[0], next_state.state_index[1])  # same keys, same draws


def test_gymnasium_env_passes_check_env_and_make():
    from gymnasium.utils.env_checker import check_env

    for mode in E.OBS_MODES:
        check_env(E.ICUSepsisEnv(obs_mode=mode), skip_render_check=True)
    env = gymnasium.make(E.ENV_ID, strategy="terminate")
    obs, info = env.reset(seed=0)
    assert obs.shape == (E.OBS_DIM,)
    assert set(info) >= {"admissible_actions", "state_vector", "sofa_score"}
    returns = []
    for episode in range(300):
        obs, info = env.reset(seed=episode)
        done, total = False, 0.0
        while not done:
            obs, reward, terminated, truncated, info = env.step(info["admissible_actions"][0])
            total += reward
            done = terminated or truncated
        returns.append(total)
    assert 0.5 < np.mean(returns) < 1.0  # admissible actions only: no instant deaths under 'terminate'


def test_batched_reset_and_step_match_the_single_env_semantics(params):
    obs, state = jax.jit(E.reset_batch, static_argnums=2)(jax.random.key(0), params, 512)
    assert obs.shape == (512, E.OBS_DIM) and state.state_index.shape == (512,)
    assert not bool(jnp.any(params.terminal[state.state_index]))
    step = jax.jit(E.step_autoreset_batch)
    obs, new_state, reward, terminated, _, info = step(jax.random.key(1), state, jnp.zeros(512, jnp.int32), params)
    ended = np.asarray(terminated)
    np.testing.assert_array_equal(np.asarray(new_state.time), np.where(ended, 0, 1))
    np.testing.assert_array_equal(np.asarray(reward), np.asarray(info["next_state_index"]) == E.SURVIVAL)
    np.testing.assert_array_equal(obs, params.state_vectors[new_state.state_index])
    np.testing.assert_array_equal(info["final_obs"], params.state_vectors[info["next_state_index"]])
    again = step(jax.random.key(1), state, jnp.zeros(512, jnp.int32), params)
    np.testing.assert_array_equal(again[1].state_index, new_state.state_index)
    # The next states follow the shipped dynamics: every drawn transition has positive probability.
    tx = E.shipped_arrays()["tx_mat"]
    assert tx[np.asarray(state.state_index), 0, np.asarray(info["next_state_index"])].min() > 0


def test_env_sepsis_cli_baselines_and_reference_bench(capsys):
    """The CLI in-process (a subprocess would pay the imports again): baselines reproduce the facts
    sheet; the reference env of the bench runs with the legacy-gym warning silenced."""
    import json

    import env_sepsis

    assert env_sepsis.main(["baselines", "--json"]) == 0
    table = json.loads(capsys.readouterr().out)
    assert table["mean"]["optimal"]["expected_return"] == pytest.approx(FACTS_MEAN["optimal"][0], abs=1e-5)
    assert table["terminate"]["clinician"]["expected_return"] == pytest.approx(FACTS_TERMINATE["clinician"], abs=1e-5)
    assert table["mean"]["random"]["expected_return_float32"] == pytest.approx(FACTS_MEAN["random"][0], abs=1e-4)

    # The bench's JAX side compiles three scan programs (about 25 s here); check its reference side only.
    rate = env_sepsis.reference_bench_runner(200)()
    assert rate > 0
    assert "gym" not in capsys.readouterr().err.lower()  # the legacy-gym import warning is silenced


def test_concurrent_batched_solves_do_not_deadlock_after_scipy_import():
    """Two batched evaluations in one program deadlocked jaxlib's 2-thread pool (batched LUs); the solves
    now never batch (cleansepsis.linalg). Run in a subprocess so a hang is a timeout, not a stuck suite."""
    import os
    import subprocess
    import sys

    code = (
        "import scipy.linalg, jax, jax.numpy as jnp\n"
        "from cleansepsis import env as E\n"
        "p = E.load_params(); pols = jnp.stack([E.random_policy(p)] * 4)\n"
        "two = jax.jit(lambda a, b, p: (E.policy_evaluation(a, p), E.policy_evaluation(b, p)))\n"
        "for _ in range(3): jax.block_until_ready(two(pols, pols * 1.0, p))\n"
        "print('done')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_NUM_THREADS"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0 and "done" in out.stdout, out.stderr[-2000:]


def test_bench_rollout_split_over_devices_matches_the_one_device_rollout():
    """The bench's multi-device variant: on a one-device mesh (the test process has one device) the
    sharded rollout with seed s is exactly the plain rollout with key s; the checksums are the sums."""
    import env_sepsis

    params = E.load_params(obs_mode="index")
    _, state = E.reset_batch(jax.random.key(0), params, 64)
    plain = env_sepsis._jax_rollout(jax.random.key(7), state, params, 6, True)
    sharded = env_sepsis._sharded_rollout(params, 6, True, "threefry2x32", 1)(7, state)
    np.testing.assert_array_equal(plain[0].state_index, sharded[0].state_index)
    np.testing.assert_array_equal(plain[0].time, sharded[0].time)
    assert float(plain[1]) == float(sharded[1]) and int(plain[2]) == int(sharded[2])
    with pytest.raises(SystemExit, match="multiple of the 3 devices"):
        env_sepsis.bench_results(64, 6, 1, 10, "icu-sepsis", "threefry2x32", n_devices=3)
