"""load_policy: same actions as the trained network, clear errors on mismatched inputs, dose decoding."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import cleansepsis
from cleansepsis.checkpoint import linear_layers, save_checkpoint
from cleansepsis.policy import PolicyError, level_range

FEATURES = ["map", "hr", "lactate", "sofa"]
NORMALISATION = {"mean": [70.0, 90.0, 2.0, 5.0], "std": [10.0, 15.0, 1.0, 3.0]}
BINS = {"vaso_edges": [0.05, 0.1, 0.3], "fluid_edges": [50.0, 200.0, 500.0], "vaso_unit": "ug/kg/min",
        "fluid_unit": "mL per step"}  # fmt: skip


def save_mlp(path, outputs: str, action_bins=None, seed: int = 0):
    mlp = eqx.nn.MLP(4, 25, 16, 2, key=jax.random.key(seed))
    config = {
        "network": {"kind": "mlp", "activation": "relu", "hidden": ["h0", "h1"], "output": "out"},
        "outputs": outputs,
        "obs_dim": 4,
        "n_actions": 25,
        "feature_names": FEATURES,
        "normalisation": NORMALISATION,
        "action_bins": action_bins,
    }
    save_checkpoint(path, linear_layers(mlp, ["h0", "h1", "out"]), config)
    return mlp


def test_round_trip_gives_the_trained_networks_actions(tmp_path):
    mlp = save_mlp(tmp_path / "q", "q_values")
    policy = cleansepsis.load_policy(tmp_path / "q", feature_names=FEATURES, normalisation=NORMALISATION)
    obs = jax.random.normal(jax.random.key(1), (64, 4))
    q = jax.vmap(mlp)(obs)
    np.testing.assert_array_equal(policy.select_action(obs), np.asarray(jnp.argmax(q, axis=1)))
    assert policy.select_action(obs[0]) == int(jnp.argmax(q[0]))
    probs = np.asarray(policy.action_probs(obs))
    np.testing.assert_allclose(probs.sum(1), 1.0)
    assert set(np.unique(probs)) == {0.0, 1.0}
    # with a mask the greedy action is the best admissible one
    mask = np.ones((64, 25), bool)
    mask[np.arange(64), np.asarray(jnp.argmax(q, axis=1))] = False
    masked = np.asarray(jnp.argmax(jnp.where(mask, q, -jnp.inf), axis=1))
    np.testing.assert_array_equal(policy.select_action(obs, mask), masked)


def test_logits_policy_is_the_softmax(tmp_path):
    mlp = save_mlp(tmp_path / "bc", "logits", seed=3)
    policy = cleansepsis.load_policy(tmp_path / "bc")
    obs = jax.random.normal(jax.random.key(2), (8, 4))
    np.testing.assert_allclose(policy.action_probs(obs), jax.nn.softmax(jax.vmap(mlp)(obs)), rtol=1e-5, atol=1e-6)
    mask = np.zeros((8, 25), bool)
    mask[:, [3, 7]] = True
    probs = np.asarray(policy.action_probs(obs, mask))
    np.testing.assert_allclose(probs[:, [3, 7]].sum(1), 1.0, rtol=1e-5)


def test_mismatched_inputs_are_named(tmp_path):
    save_mlp(tmp_path / "p", "q_values")
    with pytest.raises(PolicyError, match=r"obs_dim 4 but .* has 5"):
        cleansepsis.load_policy(tmp_path / "p", obs_dim=5)
    with pytest.raises(PolicyError, match="feature 2 is 'lactate' in the checkpoint but 'glucose'"):
        cleansepsis.load_policy(tmp_path / "p", feature_names=["map", "hr", "glucose", "sofa"])
    other = {"mean": [70.0, 90.0, 2.0, 5.0], "std": [10.0, 15.0, 1.5, 3.0]}
    with pytest.raises(PolicyError, match=r"normalisation differs .*std\[2\]"):
        cleansepsis.load_policy(tmp_path / "p", normalisation=other)
    meta = {"obs_dim": 4, "feature_names": FEATURES[::-1], "normalisation": NORMALISATION, "source": "x"}
    with pytest.raises(PolicyError, match="feature 0 is 'map'"):
        cleansepsis.load_policy(tmp_path / "p", meta)
    policy = cleansepsis.load_policy(tmp_path / "p")
    with pytest.raises(PolicyError, match=r"obs has shape \(3,\)"):
        policy.select_action(np.zeros(3))


def test_decode_action_gives_levels_and_dose_ranges(tmp_path):
    save_mlp(tmp_path / "p", "q_values", action_bins=BINS)
    policy = cleansepsis.load_policy(tmp_path / "p")
    decoded = policy.decode_action(5 * 2 + 4)  # fluid level 2, vaso level 4
    assert (decoded["fluid_level"], decoded["vaso_level"]) == (2, 4)
    assert decoded["vaso_range"] == (0.3, float("inf"))
    assert decoded["fluid_range"] == (50.0, 200.0)
    assert decoded["vaso_unit"] == "ug/kg/min"
    assert policy.decode_action(0)["vaso_range"] == (0.0, 0.0)
    with pytest.raises(PolicyError, match="action 25 outside"):
        policy.decode_action(25)
    save_mlp(tmp_path / "icu", "q_values")
    assert "levels only" in cleansepsis.load_policy(tmp_path / "icu").decode_action(3)["note"]
    assert level_range(1, [1.0, 2.0, 3.0]) == (0.0, 1.0)
