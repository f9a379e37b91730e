"""Checkpoints: safetensors + config.json round trip, the forward pass without training code, clear errors."""

import json

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleansepsis.checkpoint import (
    CheckpointError,
    linear_layers,
    load_checkpoint,
    network_forward,
    save_checkpoint,
)
from cleansepsis.io import OutputExistsError

OBS_DIM, N_ACTIONS = 5, 4
NETWORK = {"kind": "mlp", "activation": "relu", "hidden": ["hidden_0", "hidden_1"], "output": "output"}


def _mlp(seed: int = 0) -> eqx.nn.MLP:
    return eqx.nn.MLP(OBS_DIM, N_ACTIONS, width_size=8, depth=2, key=jax.random.key(seed))


def _config() -> dict:
    return {"network": NETWORK, "outputs": "q_values", "obs_dim": OBS_DIM, "n_actions": N_ACTIONS}


def test_round_trip_gives_the_trained_networks_outputs(tmp_path):
    mlp = _mlp()
    path = save_checkpoint(tmp_path / "ckpt", linear_layers(mlp, ["hidden_0", "hidden_1", "output"]), _config())
    tensors, config = load_checkpoint(path)
    obs = jax.random.normal(jax.random.key(1), (16, OBS_DIM))
    expected = jax.vmap(mlp)(obs)
    np.testing.assert_allclose(network_forward(tensors, config["network"], obs), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(network_forward(tensors, config["network"], obs[0]), expected[0], rtol=1e-5, atol=1e-6)
    assert not any(p.suffix in (".pkl", ".pickle") for p in path.iterdir())


def test_dueling_forward_is_value_plus_centred_advantage(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "hidden_0.weight": rng.normal(size=(6, OBS_DIM)).astype(np.float32),
        "hidden_0.bias": rng.normal(size=6).astype(np.float32),
        "value.weight": rng.normal(size=(1, 6)).astype(np.float32),
        "value.bias": rng.normal(size=1).astype(np.float32),
        "advantage.weight": rng.normal(size=(N_ACTIONS, 6)).astype(np.float32),
        "advantage.bias": rng.normal(size=N_ACTIONS).astype(np.float32),
    }
    network = {"kind": "dueling_mlp", "activation": "relu", "hidden": ["hidden_0"], "value": "value",
               "advantage": "advantage"}
    path = save_checkpoint(tmp_path / "d", tensors, {**_config(), "network": network})
    loaded, config = load_checkpoint(path)
    obs = rng.normal(size=(3, OBS_DIM)).astype(np.float32)
    h = np.maximum(obs @ tensors["hidden_0.weight"].T + tensors["hidden_0.bias"], 0)
    v = h @ tensors["value.weight"].T + tensors["value.bias"]
    a = h @ tensors["advantage.weight"].T + tensors["advantage.bias"]
    np.testing.assert_allclose(network_forward(loaded, config["network"], obs), v + a - a.mean(1, keepdims=True),
                               rtol=1e-5, atol=1e-5)


def test_existing_checkpoint_is_not_overwritten_unless_asked(tmp_path):
    tensors = linear_layers(_mlp(0), ["hidden_0", "hidden_1", "output"])
    save_checkpoint(tmp_path / "c", tensors, _config())
    with pytest.raises(OutputExistsError, match="already exists"):
        save_checkpoint(tmp_path / "c", tensors, _config())
    other = linear_layers(_mlp(1), ["hidden_0", "hidden_1", "output"])
    save_checkpoint(tmp_path / "c", other, _config(), overwrite=True)
    loaded, _ = load_checkpoint(tmp_path / "c")
    np.testing.assert_array_equal(loaded["output.bias"], other["output.bias"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folders left behind


def test_shape_mismatch_is_refused_before_writing(tmp_path):
    tensors = linear_layers(_mlp(), ["hidden_0", "hidden_1", "output"])
    with pytest.raises(CheckpointError, match="layer 'hidden_0'"):
        save_checkpoint(tmp_path / "bad", tensors, {**_config(), "obs_dim": OBS_DIM + 1})
    assert not (tmp_path / "bad").exists()


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda p: (p / "config.json").unlink(), "config.json is missing"),
        (lambda p: (p / "config.json").write_text("{not json"), "not valid JSON"),
        (lambda p: (p / "model.safetensors").write_bytes(b"\x00" * 10), "SHA-256 .* differs"),
        (lambda p: (p / "config.json").write_text(json.dumps({**_config(), "format": "other", "format_version": 1})),
         "format 'other'"),
        (lambda p: (p / "config.json").write_text(json.dumps({"format": "cleansepsis-policy"})), "is missing"),
    ],
)
def test_damaged_checkpoint_gets_a_clear_error(tmp_path, damage, message):
    path = save_checkpoint(tmp_path / "c", linear_layers(_mlp(), ["hidden_0", "hidden_1", "output"]), _config())
    damage(path)
    with pytest.raises(CheckpointError, match=message):
        load_checkpoint(path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere"):
        load_checkpoint(tmp_path / "nowhere")


def test_unknown_activation_is_refused(tmp_path):
    tensors = linear_layers(_mlp(), ["hidden_0", "hidden_1", "output"])
    with pytest.raises(CheckpointError, match="activation 'swish2'"):
        save_checkpoint(tmp_path / "c", tensors, {**_config(), "network": {**NETWORK, "activation": "swish2"}})


def test_forward_is_jittable():
    mlp = _mlp()
    tensors = {k: jnp.asarray(v) for k, v in linear_layers(mlp, ["hidden_0", "hidden_1", "output"]).items()}
    out = jax.jit(lambda t, x: network_forward(t, NETWORK, x))(tensors, jnp.ones((2, OBS_DIM)))
    assert out.shape == (2, N_ACTIONS)
