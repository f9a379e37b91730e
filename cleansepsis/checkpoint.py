"""Policy checkpoints: weights in safetensors, everything else in config.json. Never pickle.

A checkpoint folder holds
    model.safetensors   float32 tensors, named `<layer>.weight` (out, in) and `<layer>.bias` (out,),
                        the layout of `equinox.nn.Linear` (y = W x + b)
    config.json         {"format": "cleansepsis-policy", "format_version": 1, "network": {...}, ...}

`network` says how to run the tensors without the training code:
    {"kind": "mlp", "activation": "relu", "hidden": ["hidden_0", "hidden_1"], "output": "output"}
    {"kind": "dueling_mlp", "activation": "relu", "hidden": [...], "value": "value", "advantage": "advantage"}
and `outputs` says what the network's output means: "q_values" (act greedily) or "logits" (a softmax
policy). Everything else in the config (obs_dim, n_actions, feature names, normalisation, replay hash,
algorithm, hyperparameters, seed) is for checking and describing the policy.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors.numpy import load_file, save_file

from cleansepsis.io import atomic_dir, write_json

FORMAT = "cleansepsis-policy"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
ACTIVATIONS = {"relu": jax.nn.relu, "tanh": jnp.tanh, "gelu": jax.nn.gelu, "silu": jax.nn.silu}
REQUIRED_CONFIG = ("format", "format_version", "network", "outputs", "obs_dim", "n_actions")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded or used; the message names the folder and the problem."""


def linear_layers(mlp: Any, names: list[str]) -> dict[str, np.ndarray]:
    """Tensors of the `equinox.nn.Linear` layers in `mlp.layers`, named in order by `names`."""
    if len(mlp.layers) != len(names):
        raise ValueError(f"{len(mlp.layers)} layers but {len(names)} names")
    tensors = {}
    for name, layer in zip(names, mlp.layers, strict=True):
        tensors[f"{name}.weight"] = np.asarray(layer.weight, np.float32)
        tensors[f"{name}.bias"] = np.asarray(layer.bias, np.float32)
    return tensors


def save_checkpoint(
    path: str | os.PathLike, tensors: dict[str, np.ndarray], config: dict[str, Any], overwrite: bool = False
) -> Path:
    """Write one policy's folder atomically and check that it loads back to the same forward pass."""
    config = {"format": FORMAT, "format_version": FORMAT_VERSION, **config}
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise CheckpointError(f"{path}: config key {key!r} is missing")
    _check_tensors(Path(path), tensors, config)
    with atomic_dir(path, overwrite=overwrite) as tmp:
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in tensors.items()}, str(tmp / WEIGHTS_FILE))
        write_json(tmp / CONFIG_FILE, config)
    return Path(path)


def load_checkpoint(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, config) of a checkpoint folder, checked for completeness and shape."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint folder (it does not exist or is a file)")
    for name in (WEIGHTS_FILE, CONFIG_FILE):
        if not (path / name).is_file():
            raise CheckpointError(f"{path}: {name} is missing")
    try:
        config = json.loads((path / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise CheckpointError(f"{path / CONFIG_FILE}: not valid JSON ({err})") from None
    for key in REQUIRED_CONFIG:
        if key not in config:
            raise CheckpointError(f"{path / CONFIG_FILE}: key {key!r} is missing")
    if config["format"] != FORMAT or config["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path / CONFIG_FILE}: format {config['format']!r} version {config['format_version']!r}; "
            f"expected {FORMAT!r} version {FORMAT_VERSION}"
        )
    try:
        tensors = load_file(str(path / WEIGHTS_FILE))
    except Exception as err:  # safetensors raises its own error types for damaged files
        raise CheckpointError(f"{path / WEIGHTS_FILE}: cannot be read ({err})") from None
    _check_tensors(path, tensors, config)
    return tensors, config


def _layer_names(network: dict[str, Any]) -> list[str]:
    kind = network.get("kind")
    if kind == "mlp":
        return [*network["hidden"], network["output"]]
    if kind == "dueling_mlp":
        return [*network["hidden"], network["value"], network["advantage"]]
    raise CheckpointError(f"unknown network kind {kind!r}; expected 'mlp' or 'dueling_mlp'")


def _check_tensors(path: Path, tensors: dict[str, np.ndarray], config: dict[str, Any]) -> None:
    network = config["network"]
    if network.get("activation") not in ACTIVATIONS:
        raise CheckpointError(f"{path}: unknown activation {network.get('activation')!r}")
    width = int(config["obs_dim"])
    for name in network["hidden"]:
        width = _check_layer(path, tensors, name, width)
    n_actions = int(config["n_actions"])
    if network["kind"] == "mlp":
        heads = [(network["output"], n_actions)]
    else:
        heads = [(network["value"], 1), (network["advantage"], n_actions)]
    for name, out in heads:
        if _check_layer(path, tensors, name, width) != out:
            raise CheckpointError(f"{path}: layer {name!r} has {tensors[name + '.bias'].shape[0]} outputs; expected {out}")


def _check_layer(path: Path, tensors: dict[str, np.ndarray], name: str, width: int) -> int:
    weight, bias = tensors.get(f"{name}.weight"), tensors.get(f"{name}.bias")
    if weight is None or bias is None:
        raise CheckpointError(f"{path}: tensors {name}.weight and {name}.bias are required")
    if weight.ndim != 2 or weight.shape[1] != width or bias.shape != (weight.shape[0],):
        raise CheckpointError(
            f"{path}: layer {name!r} has weight {weight.shape} and bias {bias.shape}; expected (out, {width}) and (out,)"
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
