"""The plain ReLU MLP the learners share, and its checkpoint export. A fork that wants another network
defines it in its own file (dqn.py's dueling network is an example)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import numpy as np

from cleansepsis.checkpoint import linear_layers


class MLP(eqx.Module):
    """One observation (in_size,) -> (out_size,), or () for out_size "scalar"; ReLU between the layers
    whose widths are `hidden`."""

    layers: list[eqx.nn.Linear]

    def __init__(self, in_size: int, out_size: int | str, hidden: tuple[int, ...], key: jax.Array):
        widths = [in_size, *hidden, out_size]
        keys = jax.random.split(key, len(widths) - 1)
        self.layers = [eqx.nn.Linear(i, o, key=k) for i, o, k in zip(widths[:-1], widths[1:], keys, strict=True)]

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers[:-1]:
            x = jax.nn.relu(layer(x))
        return self.layers[-1](x)


def structure(make: Callable[[], Any]) -> Any:
    """The non-array parts of the model that `make()` builds, traced abstractly: no weights are drawn and
    nothing is compiled (building them eagerly cost about 3 s of small compilations per learner run)."""
    abstract = eqx.filter_eval_shape(make)
    return eqx.partition(abstract, lambda leaf: isinstance(leaf, jax.ShapeDtypeStruct))[1]


def array_part(model: eqx.Module) -> Any:
    return eqx.filter(model, eqx.is_array)


def layer_names(n_hidden: int) -> list[str]:
    return [*(f"hidden_{i}" for i in range(n_hidden)), "output"]


def export_mlp(params: Any, static: Any) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """(tensors, network) of one MLP as `cleansepsis.checkpoint.save_checkpoint` takes them."""
    net = eqx.combine(params, static)
    names = layer_names(len(net.layers) - 1)
    network = {"kind": "mlp", "activation": "relu", "hidden": names[:-1], "output": "output"}
    return linear_layers(net, names), network
