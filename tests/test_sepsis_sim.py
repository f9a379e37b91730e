"""The Oberst-Sontag simulator: exact kernel against the per-step rules, published numbers, sampler, replay."""

import random

import jax
import numpy as np
import pytest

from cleansepsis import mdp
from cleansepsis import sepsis_sim as S

VITALS = ("hr", "sbp", "o2", "glu")


@pytest.mark.parametrize("version", S.VERSIONS)
def test_kernel_equals_the_rules_per_factor_and_jointly(version):
    """Every (state, action) pair of a spread of states: the exact enumeration of the plain-Python rules
    equals the kernel row (jointly) and each vital's factor kernel (its marginal), to rounding."""
    tx = S.transition_matrix(version)
    for s in range(0, S.N_STATES, 13):
        state = S.decode(s)
        diab, abx0, vaso0, vent0 = state[0], state[5], state[6], state[7]
        for action in range(S.N_ACTIONS):
            dist = S.rules_distribution(state, action, version)
            row = np.zeros(S.N_STATES)
            for nxt, p in dist.items():
                row[S.encode(*nxt)] += p
            np.testing.assert_allclose(row, tx[s, action], atol=1e-15, err_msg=f"{version} s={s} a={action}")
            kernels = S.factor_kernels(action, abx0, vaso0, vent0, diab, version)
            for position, vital in enumerate(VITALS, start=1):
                marginal = np.zeros(S.LEVELS[vital])
                for nxt, p in dist.items():
                    marginal[nxt[position]] += p
                np.testing.assert_allclose(
                    marginal,
                    kernels[vital][state[position]],
                    atol=1e-15,
                    err_msg=f"{version} {vital} s={s} a={action}",
                )


def test_spot_values_counts_and_start_distribution():
    for version in S.VERSIONS:
        tx = S.transition_matrix(version)
        assert tx[0, 0, 0] == pytest.approx(0.6561) and tx[1, 0, 0] == pytest.approx(0.729)
        assert tx[0, 1, 2] == pytest.approx(0.243) and tx[380, 0, 376] == pytest.approx(0.5832)
        assert tx[376, 0, 376] == pytest.approx(0.4608)
        np.testing.assert_allclose(tx.sum(-1), 1.0, atol=1e-12)
    # the master bug: a non-diabetic's glucose row from hi2 under no vasopressors
    np.testing.assert_allclose(S.factor_kernels(0, 0, 0, 0, 0, "original")["glu"][4], [0, 0.1, 0, 0.1, 0.8])
    np.testing.assert_allclose(S.factor_kernels(0, 0, 0, 0, 0, "v2")["glu"][4], [0, 0, 0, 0.1, 0.9])
    death, discharge = S.terminal_classes()
    assert (death.sum(), discharge.sum(), (~death & ~discharge).sum()) == (832, 2, 606)
    assert list(np.flatnonzero(discharge)) == [376, 1096]
    start = S.start_distribution("os")
    assert (start > 0).sum() == 74 and start[720:].sum() == pytest.approx(0.1897, abs=5e-5)
    u606 = S.start_distribution("tw606")
    assert (u606 > 0).sum() == 606 and u606[720:].sum() == pytest.approx(0.2)


def test_published_numbers():
    """The fact sheet's exact figures (20 steps, gamma 1, OS start unless noted)."""
    v2 = S.load_params("v2")
    table = S.reference_values(v2)
    assert table["clinician"]["expected_return"] == pytest.approx(0.4334, abs=5e-5)
    assert table["greedy_clinician"]["expected_return"] == pytest.approx(0.5218, abs=5e-5)
    assert table["random"]["expected_return"] == pytest.approx(-0.7164, abs=5e-5)
    assert table["optimal"]["expected_return"] == pytest.approx(0.5808, abs=5e-5)
    assert table["clinician"]["mean_length"] == pytest.approx(11.5, abs=0.05)
    assert S.tang_wiens_optimum("v2") == pytest.approx(0.6775418, abs=5e-8)
    assert S.tang_wiens_optimum("v2", "os") == pytest.approx(0.7363, abs=5e-5)
    live = ~np.logical_or(*S.terminal_classes())
    assert np.bincount(S.physician_actions("v2")[live], minlength=8).tolist() == [
        23,
        0,
        54,
        40,
        0,
        0,
        353,
        136,
    ]
    master = S.reference_values(S.load_params("original"))
    assert master["random"]["expected_return"] == pytest.approx(-0.7588, abs=5e-5)
    assert master["greedy_clinician"]["expected_return"] == pytest.approx(0.4130, abs=5e-5)
    assert master["optimal"]["expected_return"] == pytest.approx(0.4483, abs=5e-5)
    assert S.tang_wiens_optimum("original") == pytest.approx(0.3344, abs=5e-5)
    # master has 56 live states whose best actions tie exactly (value 0: kept alive, never discharged);
    # lowest-index tie-breaking gives 0.3118, inside OS's published 0.3097-0.3240 (the fact sheet: 0.3203)
    assert master["clinician"]["expected_return"] == pytest.approx(0.3118, abs=5e-5)


def test_float32_jax_evaluation_and_observation_policies():
    params = S.load_params()
    table = S.reference_values(params)
    ret, length = jax.jit(mdp.policy_evaluation)(mdp.clinician_policy(params), params)
    assert float(ret) == pytest.approx(table["clinician"]["expected_return"], abs=1e-5)
    assert float(length) == pytest.approx(table["clinician"]["mean_length"], abs=1e-4)
    _, v = jax.jit(mdp.value_iteration)(params)
    assert float(params.start_dist @ v) == pytest.approx(table["optimal"]["expected_return"], abs=1e-5)
    # a policy over the 720 observations acts identically in the two diabetes blocks
    obs_policy = jax.random.dirichlet(jax.random.key(0), np.ones(S.N_ACTIONS), (S.N_OBS_STATES,))
    lifted = np.asarray(mdp.observation_policy(obs_policy, params))
    np.testing.assert_array_equal(lifted[:720], lifted[720:])
    terminal = np.asarray(params.terminal)
    want = mdp.np_policy_evaluation(
        lifted.astype(np.float64),
        S.transition_matrix("v2"),
        S.start_distribution("os"),
        S.reward_next(),
        terminal,
        1.0,
        20,
    )
    got = mdp.policy_evaluation(lifted, params)
    assert float(got[0]) == pytest.approx(want[0], abs=1e-5)
    p144 = S.load_params(observation="obs144")
    assert p144.n_obs == 144 and p144.obs_dim == 14 and S.load_params(observation="full1440").obs_dim == 21
    with pytest.raises(ValueError, match="needs 144 rows"):
        mdp.observation_policy(obs_policy, p144)


def test_python_rules_and_jax_sampler_match_the_kernel():
    """Chi-square of 20,000 draws per pair, from the plain-Python rules and from the JAX env."""
    chisquare = pytest.importorskip("scipy.stats").chisquare
    params = S.load_params()
    tx = S.transition_matrix("v2")
    rng = random.Random(0)
    n = 20_000
    step = jax.jit(jax.vmap(mdp.step, in_axes=(0, None, None, None)))
    live = np.flatnonzero(~np.asarray(params.terminal))
    for s, action in ((int(live[0]), 0), (int(live[100]), 5), (int(live[400]), 7), (int(live[-1]), 3)):
        expected = tx[s, action] * n
        python = np.bincount(
            [S.encode(*S.rules_step(S.decode(s), action, rng.random)) for _ in range(n)], minlength=S.N_STATES
        )
        state = mdp.EnvState(state_index=np.int32(s), time=np.int32(0))
        drawn = np.asarray(step(jax.random.split(jax.random.key(s), n), state, action, params)[1].state_index)
        jax_counts = np.bincount(drawn, minlength=S.N_STATES)
        for counts in (python, jax_counts):
            assert counts[expected == 0].sum() == 0
            keep = expected >= 5
            observed = np.append(counts[keep], counts[~keep].sum())
            wanted = np.append(expected[keep], expected[~keep].sum())
            ok = wanted > 0
            assert chisquare(observed[ok], wanted[ok] * observed[ok].sum() / wanted[ok].sum()).pvalue > 1e-4


def test_sepsis_sim_replay_cli(tmp_path):
    import data_prep
    from cleansepsis.replay import load_replay

    out = tmp_path / "sim.parquet"
    assert data_prep.main(["sepsis-sim", "--episodes", "300", "--seed", "1", "--out", str(out)]) == 0
    replay = load_replay(out)
    assert replay.meta["env_id"] == S.ENV_ID and replay.obs_dim == 19 and replay.n_actions == 8
    params = mdp.params_for_replay(replay.meta)
    assert params is not None and params.spec[:3] == ("sepsis-sim", "v2", "obs720")
    data = replay.split("train")
    physician = S.physician_policy("v2")
    np.testing.assert_allclose(
        np.asarray(data.behavior_prob),
        physician[np.asarray(data.state_index), np.asarray(data.action)],
        atol=1e-6,
    )
    np.testing.assert_array_equal(
        np.asarray(data.obs), np.asarray(params.state_vectors)[np.asarray(data.state_index)]
    )
    assert (
        data_prep.main(["sepsis-sim", "--episodes", "300", "--seed", "1", "--out", str(out)]) == 1
    )  # exists


def test_env_sepsis_cli_baselines_for_the_simulator(capsys):
    import json

    import env_sepsis

    assert env_sepsis.main(["baselines", "--json", "--mdp", "sepsis-sim"]) == 0
    (table,) = json.loads(capsys.readouterr().out).values()
    assert table["clinician"]["expected_return"] == pytest.approx(0.4334, abs=5e-5)
    assert table["clinician"]["expected_return_float32"] == pytest.approx(0.4334, abs=1e-4)
    assert table["optimal"]["expected_return_float32"] == pytest.approx(0.5808, abs=1e-4)
