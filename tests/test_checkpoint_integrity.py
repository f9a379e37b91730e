"""Checkpoints load only what was saved: every test saves a valid checkpoint, tampers with one thing, and
checks that load_checkpoint and load_policy refuse it with a CheckpointError naming the file and problem
(never a TypeError or KeyError), including tampering that also recomputes the recorded hash."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from safetensors.numpy import save_file

import cleansepsis
from cleansepsis.checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    CheckpointError,
    UnverifiedCheckpointWarning,
    file_sha256,
    load_checkpoint,
    save_checkpoint,
)

OBS_DIM, N_ACTIONS, WIDTH = 5, 4, 8
NETWORK = {"kind": "mlp", "activation": "relu", "hidden": ["hidden_0"], "output": "output"}


def _tensors(width: int = WIDTH, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "hidden_0.weight": rng.normal(size=(width, OBS_DIM)).astype(np.float32),
        "hidden_0.bias": rng.normal(size=width).astype(np.float32),
        "output.weight": rng.normal(size=(N_ACTIONS, width)).astype(np.float32),
        "output.bias": rng.normal(size=N_ACTIONS).astype(np.float32),
    }


def _config() -> dict:
    return {"network": dict(NETWORK), "outputs": "q_values", "obs_dim": OBS_DIM, "n_actions": N_ACTIONS,
            "feature_names": [f"x{i}" for i in range(OBS_DIM)], "algo": "test", "seed": 0}


@pytest.fixture
def ckpt(tmp_path):
    return save_checkpoint(tmp_path / "ckpt", _tensors(), _config())


def _config_of(path) -> dict:
    return json.loads((path / CONFIG_FILE).read_text())


def _write_config(path, config) -> None:
    (path / CONFIG_FILE).write_text(json.dumps(config))


def _replace_weights(path, tensors: dict[str, np.ndarray], rehash: bool) -> None:
    """Overwrite the weights; with rehash, also record their new hash and shapes, as a forger would."""
    save_file(tensors, str(path / WEIGHTS_FILE))
    if rehash:
        config = _config_of(path)
        config["weights_sha256"] = file_sha256(path / WEIGHTS_FILE)
        config["tensors"] = {k: list(v.shape) for k, v in tensors.items()}
        _write_config(path, config)


def _refused(path, message: str) -> None:
    with pytest.raises(CheckpointError, match=message) as err:
        load_checkpoint(path)
    assert str(path) in str(err.value)
    with pytest.raises(CheckpointError, match=message):
        cleansepsis.load_policy(path)


def test_config_records_shapes_and_the_weights_hash(ckpt):
    config = _config_of(ckpt)
    assert config["format_version"] == 2
    assert config["weights_sha256"] == file_sha256(ckpt / WEIGHTS_FILE)
    assert config["tensors"] == {k: list(v.shape) for k, v in _tensors().items()}
    tensors, _ = load_checkpoint(ckpt)
    assert all(np.array_equal(tensors[k], v) for k, v in _tensors().items())


def test_same_tensors_give_the_same_bytes(tmp_path):
    a = save_checkpoint(tmp_path / "a", _tensors(), _config())
    b = save_checkpoint(tmp_path / "b", _tensors(), _config())
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        assert (a / name).read_bytes() == (b / name).read_bytes()


def test_weights_of_another_checkpoint_are_refused(tmp_path, ckpt):
    wide = save_checkpoint(tmp_path / "wide", _tensors(width=16, seed=1), _config())
    (ckpt / WEIGHTS_FILE).write_bytes((wide / WEIGHTS_FILE).read_bytes())
    _refused(ckpt, "SHA-256 .* differs from .* recorded in config.json")


def test_weights_of_another_checkpoint_with_a_forged_hash_are_refused_by_shape(tmp_path, ckpt):
    _replace_weights(ckpt, _tensors(width=16, seed=1), rehash=False)
    config = _config_of(ckpt)
    config["weights_sha256"] = file_sha256(ckpt / WEIGHTS_FILE)  # hash forged, shapes left as saved
    _write_config(ckpt, config)
    _refused(ckpt, r"tensor 'hidden_0.bias' has shape \(16,\); config.json records \(8,\)")


def test_transposed_square_layer_is_refused(tmp_path):
    tensors = _tensors(width=OBS_DIM)
    path = save_checkpoint(tmp_path / "sq", tensors, _config())
    _replace_weights(path, {**tensors, "hidden_0.weight": tensors["hidden_0.weight"].T.copy()}, rehash=False)
    _refused(path, "SHA-256")


def test_transposed_layer_is_refused_by_shape(ckpt):
    tensors = _tensors()
    _replace_weights(ckpt, {**tensors, "output.weight": tensors["output.weight"].T.copy()}, rehash=True)
    _refused(ckpt, r"layer 'output' has weight \(8, 4\)")


@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_weights_are_refused(ckpt, value):
    tensors = _tensors()
    tensors["output.bias"][1] = value
    _replace_weights(ckpt, tensors, rehash=True)
    _refused(ckpt, r"tensor 'output.bias' has 1 non-finite value")


@pytest.mark.parametrize("dtype", [np.float16, np.float64, np.int64])
def test_weights_that_are_not_float32_are_refused(ckpt, dtype):
    tensors = {k: v.astype(dtype) for k, v in _tensors().items()}
    _replace_weights(ckpt, tensors, rehash=True)
    _refused(ckpt, f"has dtype {np.dtype(dtype).name}; expected float32")


def test_extra_tensor_is_refused(ckpt):
    _replace_weights(ckpt, {**_tensors(), "spare.weight": np.ones((2, 2), np.float32)}, rehash=True)
    _refused(ckpt, r"tensor\(s\) \['spare.weight'\] are not part of the network")


def test_missing_tensor_is_refused(ckpt):
    tensors = _tensors()
    del tensors["output.bias"]
    _replace_weights(ckpt, tensors, rehash=True)
    _refused(ckpt, r"tensor\(s\) \['output.bias'\] are missing")


def test_saving_non_finite_or_extra_tensors_is_refused(tmp_path):
    bad = _tensors()
    bad["hidden_0.bias"][0] = np.nan
    with pytest.raises(CheckpointError, match="non-finite"):
        save_checkpoint(tmp_path / "a", bad, _config())
    with pytest.raises(CheckpointError, match="not part of the network"):
        save_checkpoint(tmp_path / "b", {**_tensors(), "x.weight": np.ones(1)}, _config())
    with pytest.raises(CheckpointError, match="dtype int64"):
        save_checkpoint(tmp_path / "c", {**_tensors(), "output.bias": np.ones(N_ACTIONS, np.int64)}, _config())
    assert list(tmp_path.iterdir()) == []


CONFIG_EDITS = {
    "unknown outputs": (lambda c: {**c, "outputs": "probabilities"}, "outputs 'probabilities'"),
    "unknown network kind": (lambda c: {**c, "network": {**c["network"], "kind": "resnet"}},
                             "unknown network kind 'resnet'"),
    "unknown network key": (lambda c: {**c, "network": {**c["network"], "dropout": 0.1}}, r"unknown \['dropout'\]"),
    "missing network key": (lambda c: {**c, "network": {k: v for k, v in c["network"].items() if k != "output"}},
                            r"missing \['output'\]"),
    "unknown activation": (lambda c: {**c, "network": {**c["network"], "activation": "swish2"}},
                           "unknown activation 'swish2'"),
    "network not an object": (lambda c: {**c, "network": ["hidden_0"]}, "network is"),
    "hidden not a list": (lambda c: {**c, "network": {**c["network"], "hidden": "hidden_0"}}, "network hidden is"),
    "hidden names not strings": (lambda c: {**c, "network": {**c["network"], "hidden": [0]}}, "network hidden is"),
    "repeated layer name": (lambda c: {**c, "network": {**c["network"], "output": "hidden_0"}}, "must be distinct"),
    "obs_dim a string": (lambda c: {**c, "obs_dim": "5"}, "obs_dim is '5'"),
    "obs_dim a boolean": (lambda c: {**c, "obs_dim": True}, "obs_dim is True"),
    "obs_dim a float": (lambda c: {**c, "obs_dim": 5.0}, "obs_dim is 5.0"),
    "n_actions zero": (lambda c: {**c, "n_actions": 0}, "n_actions is 0"),
    "config a list": (lambda c: [c], "expected a JSON object, got list"),
    "format_version a string": (lambda c: {**c, "format_version": "2"}, "version '2'"),
    "format_version from the future": (lambda c: {**c, "format_version": 3}, "version 3"),
    "missing key": (lambda c: {k: v for k, v in c.items() if k != "n_actions"}, "key 'n_actions' is missing"),
    "feature_names a string": (lambda c: {**c, "feature_names": "x0"}, "feature_names is 'x0'"),
    "feature_names of the wrong length": (lambda c: {**c, "feature_names": ["a"]}, "1 feature_names for obs_dim 5"),
    "action_bins a list": (lambda c: {**c, "action_bins": [1, 2]}, "action_bins is"),
    "hparams a list": (lambda c: {**c, "hparams": [1]}, "hparams is"),
    "hparams null": (lambda c: {**c, "hparams": None}, "hparams is None; expected dict"),
    "feature_names null": (lambda c: {**c, "feature_names": None}, "feature_names is None; expected list"),
    "hash missing": (lambda c: {k: v for k, v in c.items() if k != "weights_sha256"}, "weights_sha256 is None"),
    "hash not hex": (lambda c: {**c, "weights_sha256": "z" * 64}, "weights_sha256 is"),
    "shapes missing": (lambda c: {k: v for k, v in c.items() if k != "tensors"}, "tensors must map"),
    "shapes malformed": (lambda c: {**c, "tensors": {"output.bias": "4"}}, "tensors must map"),
    "shape edited": (lambda c: {**c, "tensors": {**c["tensors"], "output.bias": [5]}},
                     r"'output.bias' has shape \(4,\); config.json records \(5,\)"),
}


@pytest.mark.parametrize("case", sorted(CONFIG_EDITS))
def test_malformed_config_gives_a_checkpoint_error(ckpt, case):
    edit, message = CONFIG_EDITS[case]
    _write_config(ckpt, edit(_config_of(ckpt)))
    _refused(ckpt, message)


def test_config_of_the_wrong_encoding_gives_a_checkpoint_error(ckpt):
    (ckpt / CONFIG_FILE).write_bytes(b"\xff\xfe{")
    _refused(ckpt, "not valid JSON")


def test_version_1_checkpoint_loads_with_a_warning(ckpt):
    config = _config_of(ckpt)
    for key in ("weights_sha256", "tensors"):
        del config[key]
    _write_config(ckpt, {**config, "format_version": 1})
    with pytest.warns(UnverifiedCheckpointWarning, match="retrain"):
        tensors, _ = load_checkpoint(ckpt)
    assert set(tensors) == set(_tensors())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UnverifiedCheckpointWarning)
        _replace_weights(ckpt, {**_tensors(), "extra.bias": np.ones(1, np.float32)}, rehash=False)
        _refused(ckpt, "not part of the network")  # the other checks still apply


@pytest.mark.parametrize("bins", [{"vaso_edges": "0.1"}, {"fluid_edges": [3.0, 1.0, 2.0]}, {"vaso_edges": [None]}])
def test_malformed_dose_edges_are_refused_by_load_policy(ckpt, bins):
    _write_config(ckpt, {**_config_of(ckpt), "action_bins": bins})
    with pytest.raises(CheckpointError, match="action_bins"):
        cleansepsis.load_policy(ckpt)
