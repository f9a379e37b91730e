"""Policy checkpoints: weights in safetensors, everything else in config.json. Never pickle.

A checkpoint folder holds
    model.safetensors   float32 tensors, named `<layer>.weight` (out, in) and `<layer>.bias` (out,),
                        the layout of `equinox.nn.Linear` (y = W x + b)
    config.json         {"format": "cleansepsis-policy", "format_version": 1, "network": {...}, ...}

`network` says how to run the tensors without the training code:
    {"kind": "mlp", "activation": "relu", "hidden": ["hidden_0", "hidden_1"], "output": "output"}
    {"kind": "dueling_mlp", "activation": "relu", "hidden": [...], "value": "value", "advantage": "advantage"}
and `outputs` says what the network's output means: "q_values" (act greedily) or "logits" (a softmax
policy), or "action_mean" for a continuous action: one output z, the action is
low + (tanh(z) + 1) / 2 * (high - low) with the bounds and unit of the config's `action_space` (then
`n_actions` is 0 and the output layer has width 1). Everything else in the config (obs_dim, n_actions, feature names, normalisation, replay hash,
algorithm, hyperparameters, seed) is for checking and describing the policy.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from cleansepsis.io import atomic_dir, write_json

FORMAT = "cleansepsis-policy"
# 2: config.json records every tensor's shape (`tensors`) and the SHA-256 of model.safetensors
# (`weights_sha256`); 1 (before 2026-11-30) had neither: still loaded, with an UnverifiedCheckpointWarning
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu, "silu": jax.nn.silu}
OUTPUTS = ("q_values", "logits", "action_mean")
CONTINUOUS_OUTPUTS = ("action_mean",)
REQUIRED_CONFIG = ("format", "format_version", "network", "outputs", "obs_dim", "n_actions")
# the keys of each network kind, and which of them name a layer head with its output width
NETWORK_KEYS = {
    "mlp": ("kind", "activation", "hidden", "output"),
    "dueling_mlp": ("kind", "activation", "hidden", "value", "advantage"),
}
# descriptive config keys that the loaders read, and the JSON types they must have when present (None:
# may be null)
DESCRIPTIVE_TYPES: dict[str, tuple[type | None, ...]] = {
    "feature_names": (list,),
    "action_bins": (dict, None),
    "hparams": (dict,),
    "algo": (str, None),
    "seed": (int, None),
    "setting": (int, None),
    "replay_path": (str, None),
    "replay_hash": (str, None),
    "replay_source": (str, None),
    "env_id": (str, None),
    "split": (str, None),
}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or used; the message names the folder and the problem."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint of format version 1: its weights carry no hash, so they cannot be checked against what
    was saved (the other checks still apply). Retrain to get a version-2 checkpoint."""


def linear_layers(mlp: Any, names: list[str]) -> dict[str, np.ndarray]:
    """Tensors of the `equinox.nn.Linear` layers in `mlp.layers`, named in order by `names`."""
    if len(mlp.layers) != len(names):
        raise ValueError(f"{len(mlp.layers)} layers but {len(names)} names")
    tensors = {}
    for name, layer in zip(names, mlp.layers, strict=True):
        tensors[f"{name}.weight"] = np.asarray(layer.weight, np.float32)
        tensors[f"{name}.bias"] = np.asarray(layer.bias, np.float32)
    return tensors


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def save_checkpoint(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], config: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write one policy's folder atomically: the tensors as float32, and a config that records their shapes
    and the SHA-256 of the weights file. Refuses (CheckpointError) a config or tensors `load_checkpoint`
    would refuse, before anything is written."""
    path = Path(path)
    config = {**config, "format": FORMAT, "format_version": FORMAT_VERSION}
    config.pop("weights_sha256", None)
    arrays = {}
    for name, value in tensors.items():
        array = np.asarray(value)
        if not np.issubdtype(array.dtype, np.floating):
            raise CheckpointError(
                f"{path}: tensor {name!r} has dtype {array.dtype}; weights must be floating point"
            )
        arrays[name] = np.ascontiguousarray(array, np.float32)
    config["tensors"] = {name: list(arrays[name].shape) for name in sorted(arrays)}
    _check_config(path, config, require_hash=False)
    _check_tensors(path, arrays, config)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file(arrays, str(tmp / WEIGHTS_FILE))
        config["weights_sha256"] = file_sha256(tmp / WEIGHTS_FILE)
        write_json(tmp / CONFIG_FILE, config)
    return path


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, config) of a checkpoint folder. Refuses (CheckpointError, naming the file and the problem)
    a config of the wrong shape or with unknown network kinds, keys or outputs; weights whose SHA-256 or
    tensor shapes differ from those recorded; tensors the network does not use or lacks; and weights that
    are not finite float32."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (it does not exist or is a file)")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: not valid JSON ({err})") from None
    _check_config(path / CONFIG_FILE, config, require_hash=True)
    if config["format_version"] == 1:
        warnings.warn(
            f"{path}: checkpoint format version 1 records no weights hash, so its weights cannot be checked "
            "against what was saved; retrain to get a verifiable checkpoint",
            UnverifiedCheckpointWarning,
            stacklevel=2,
        )
    else:
        digest = file_sha256(path / WEIGHTS_FILE)
        if digest != config["weights_sha256"]:
            raise CheckpointError(
                f"{path / WEIGHTS_FILE}: SHA-256 {digest[:16]}... differs from "
                f"{config['weights_sha256'][:16]}... recorded in {CONFIG_FILE}; the weights were changed or "
                "replaced after saving"
            )
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error types for damaged files and unknown dtypes
        raise CheckpointError(f"{path / WEIGHTS_FILE}: cannot be read ({err})") from None
    for name, array in tensors.items():
        if array.dtype != np.float32:
            raise CheckpointError(
                f"{path / WEIGHTS_FILE}: tensor {name!r} has dtype {array.dtype}; expected float32"
            )
    _check_tensors(path / WEIGHTS_FILE, tensors, config)
    return tensors, config


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_config(path: Path, config: Any, require_hash: bool) -> None:
    """The config's structure and the types of every key a loader reads."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(config).__name__}")
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise CheckpointError(f"{path}: key {key!r} is missing")
    if (
        config["format"] != FORMAT
        or config["format_version"] not in READABLE_VERSIONS
        or isinstance(config["format_version"], bool)
    ):
        raise CheckpointError(
            f"{path}: format {config['format']!r} version {config['format_version']!r}; "
            f"expected {FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))}"
        )
    if config["outputs"] not in OUTPUTS:
        raise CheckpointError(f"{path}: outputs {config['outputs']!r}; expected one of {OUTPUTS}")
    continuous = config["outputs"] in CONTINUOUS_OUTPUTS
    for key in ("obs_dim", "n_actions"):
        if continuous and key == "n_actions":
            if config[key] != 0 or isinstance(config[key], bool):
                raise CheckpointError(f"{path}: n_actions is {config[key]!r}; a continuous policy has 0")
            continue
        if not _is_int(config[key]) or config[key] < 1:
            raise CheckpointError(f"{path}: {key} is {config[key]!r}; expected a whole number of at least 1")
    if continuous:
        _check_action_space(path, config.get("action_space"))
    for key, types in DESCRIPTIVE_TYPES.items():
        if key not in config:
            continue
        value = config[key]
        if not (value is None and None in types) and not isinstance(value, tuple(t for t in types if t)):
            wanted = " or ".join("null" if t is None else t.__name__ for t in types)
            raise CheckpointError(f"{path}: {key} is {value!r}; expected {wanted}")
    if not all(isinstance(n, str) for n in config.get("feature_names") or []):
        raise CheckpointError(f"{path}: feature_names must be a list of strings")
    if config.get("feature_names") is not None and len(config["feature_names"]) != config["obs_dim"]:
        raise CheckpointError(
            f"{path}: {len(config['feature_names'])} feature_names for obs_dim {config['obs_dim']}"
        )
    _check_network(path, config["network"])
    if config["format_version"] >= 2 and require_hash:
        digest = config.get("weights_sha256")
        if not isinstance(digest, str) or len(digest) != 64 or not set(digest) <= set("0123456789abcdef"):
            raise CheckpointError(f"{path}: weights_sha256 is {digest!r}; expected 64 lowercase hex digits")
    if config["format_version"] >= 2:
        shapes = config.get("tensors")
        if not isinstance(shapes, dict) or not all(
            isinstance(v, list) and all(_is_int(d) and d >= 0 for d in v) for v in shapes.values()
        ):
            raise CheckpointError(
                f"{path}: tensors must map each tensor name to its shape, a list of whole numbers"
            )


def _check_action_space(path: Path, space: Any) -> None:
    """A continuous policy's action space: finite bounds low < high and a unit, which its actions are in."""
    if not isinstance(space, dict) or space.get("kind") != "continuous":
        raise CheckpointError(f"{path}: action_space is {space!r}; a continuous policy needs "
                              "{'kind': 'continuous', 'name', 'unit', 'low', 'high'}")
    low, high = space.get("low"), space.get("high")
    numbers = all(isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x) for x in (low, high))
    if not numbers or not low < high or not isinstance(space.get("unit"), str):
        raise CheckpointError(f"{path}: action_space bounds [{low!r}, {high!r}] or unit {space.get('unit')!r} "
                              "are not usable; expected finite low < high and a unit")


def _check_network(path: Path, network: Any) -> None:
    if not isinstance(network, dict):
        raise CheckpointError(f"{path}: network is {network!r}; expected an object with a 'kind'")
    kind = network.get("kind")
    if kind not in NETWORK_KEYS:
        raise CheckpointError(f"{path}: unknown network kind {kind!r}; expected one of {list(NETWORK_KEYS)}")
    keys = NETWORK_KEYS[kind]
    unknown = sorted(set(network) - set(keys))
    missing = [k for k in keys if k not in network]
    if unknown or missing:
        raise CheckpointError(
            f"{path}: a {kind!r} network has keys {list(keys)}; "
            + (f"unknown {unknown}" if unknown else "")
            + ("; " if unknown and missing else "")
            + (f"missing {missing}" if missing else "")
        )
    if network["activation"] not in ACTIVATIONS:
        raise CheckpointError(
            f"{path}: unknown activation {network['activation']!r}; expected one of {list(ACTIVATIONS)}"
        )
    hidden = network["hidden"]
    if not isinstance(hidden, list) or not all(isinstance(n, str) and n for n in hidden):
        raise CheckpointError(f"{path}: network hidden is {hidden!r}; expected a list of layer names")
    names = _layer_names(network)
    if not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
        raise CheckpointError(f"{path}: network layer names {names!r} must be distinct non-empty strings")


def _layer_names(network: dict[str, Any]) -> list[str]:
    if network["kind"] == "mlp":
        return [*network["hidden"], network["output"]]
    return [*network["hidden"], network["value"], network["advantage"]]


def _check_tensors(path: Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    """Exactly the tensors the network uses, of the shapes recorded and chained from obs_dim to n_actions,
    all finite."""
    network = config["network"]
    names = _layer_names(network)
    expected = {f"{layer}.{part}" for layer in names for part in ("weight", "bias")}
    unknown, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
    if unknown:
        raise CheckpointError(f"{path}: tensor(s) {unknown} are not part of the network (layers {names})")
    if missing:
        raise CheckpointError(f"{path}: tensor(s) {missing} are missing")
    recorded = config.get("tensors")
    if recorded is not None:
        if set(recorded) != set(tensors):
            raise CheckpointError(
                f"{path}: holds tensors {sorted(tensors)} but {CONFIG_FILE} records {sorted(recorded)}"
            )
        for name, array in tensors.items():
            if list(array.shape) != list(recorded[name]):
                raise CheckpointError(
                    f"{path}: tensor {name!r} has shape {tuple(array.shape)}; {CONFIG_FILE} records "
                    f"{tuple(recorded[name])}"
                )
    width = config["obs_dim"]
    for name in network["hidden"]:
        width = _check_layer(path, tensors, name, width)
    if network["kind"] == "mlp":
        heads = [(network["output"], 1 if config["outputs"] in CONTINUOUS_OUTPUTS else config["n_actions"])]
    else:
        heads = [(network["value"], 1), (network["advantage"], config["n_actions"])]
    for name, out in heads:
        if _check_layer(path, tensors, name, width) != out:
            raise CheckpointError(
                f"{path}: layer {name!r} has {tensors[name + '.bias'].shape[0]} outputs; expected {out}"
            )
    for name in sorted(tensors):
        bad = int(np.size(tensors[name]) - np.isfinite(tensors[name]).sum())
        if bad:
            raise CheckpointError(f"{path}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf)")


def _check_layer(path: Path, tensors: dict[str, np.ndarray], name: str, width: int) -> int:
    weight, bias = tensors[f"{name}.weight"], tensors[f"{name}.bias"]
    if weight.ndim != 2 or weight.shape[1] != width or bias.shape != (weight.shape[0],):
        raise CheckpointError(
            f"{path}: layer {name!r} has weight {weight.shape} and bias {bias.shape}; expected "
            f"(out, {width}) and (out,)"
        )
    return int(weight.shape[0])


def network_forward(tensors: dict[str, Any], network: dict[str, Any], obs: jnp.ndarray) -> jnp.ndarray:
    """The checkpoint's output for obs of shape (obs_dim,) or (batch, obs_dim)."""
    act = ACTIVATIONS[network["activation"]]

    def linear(name: str, x: jnp.ndarray) -> jnp.ndarray:
        return x @ jnp.asarray(tensors[f"{name}.weight"]).T + jnp.asarray(tensors[f"{name}.bias"])

    x = jnp.asarray(obs, jnp.float32)
    for name in network["hidden"]:
        x = act(linear(name, x))
    if network["kind"] == "mlp":
        return linear(network["output"], x)
    value, advantage = linear(network["value"], x), linear(network["advantage"], x)
    return value + advantage - advantage.mean(axis=-1, keepdims=True)
