"""Use a trained policy outside the training code: `cleansepsis.load_policy(path)`.

    policy = load_policy("runs/cql__x__t/checkpoints/s0_seed0", replay=replay)   # checks inputs match
    policy.select_action(obs)          # one state (obs_dim,) -> int, or a batch (B, obs_dim) -> (B,)
    policy.action_probs(obs)           # (A,) or (B, A)
    policy.decode_action(7)            # levels and dose ranges in physical units

A continuous policy (`outputs` "action_mean", from iql_continuous.py) acts by its mean:

    policy.select_action(obs)          # one state -> float dose in the action space's unit (e.g. mg),
                                       # a batch -> (B,) float array; always within [low, high]
    policy.action_space                # {"kind": "continuous", "name": ..., "unit": "mg", "low", "high"}

A checkpoint whose `outputs` are "q_values" acts greedily over the admissible actions (all actions
when no mask is given); one with "logits" is the softmax policy (renormalised over the admissible
actions when a mask is given). For research only; not for treating patients.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cleansepsis.checkpoint import CONTINUOUS_OUTPUTS, CheckpointError, load_checkpoint, network_forward

N_LEVELS = 5  # actions are 5 * fluid_level + vaso_level, each level 0..4


class PolicyError(CheckpointError):
    """A policy that does not fit the inputs it is given; the message says what differs."""


def _same(a: Any, b: Any) -> bool:
    """Equality that tolerates float round trips through JSON."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float | int) and isinstance(b, float | int) and not isinstance(a, bool):
        return bool(np.isclose(a, b, rtol=1e-6, atol=1e-9))
    return a == b


def _first_difference(a: Any, b: Any, where: str = "") -> str:
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return f"{where or 'top level'} has keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            if not _same(a[k], b[k]):
                return _first_difference(a[k], b[k], f"{where}.{k}" if where else str(k))
    if isinstance(a, list | tuple) and isinstance(b, list | tuple) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            if not _same(x, y):
                return _first_difference(x, y, f"{where}[{i}]")
    return f"{where or 'value'}: {str(a)[:80]!r} vs {str(b)[:80]!r}"


@dataclass(frozen=True)
class Policy:
    """A loaded checkpoint: its tensors on the device and its config."""

    path: Path
    tensors: dict[str, jnp.ndarray]
    config: dict[str, Any]

    @property
    def obs_dim(self) -> int:
        return int(self.config["obs_dim"])

    @property
    def n_actions(self) -> int:
        return int(self.config["n_actions"])

    @property
    def outputs(self) -> str:
        return str(self.config["outputs"])

    @property
    def action_bins(self) -> dict[str, Any] | None:
        return self.config.get("action_bins")

    @property
    def is_continuous(self) -> bool:
        return self.outputs in CONTINUOUS_OUTPUTS

    @property
    def action_space(self) -> dict[str, Any]:
        """The continuous action space (bounds and unit), or the discrete one {"kind", "n", "encoding"}."""
        if self.is_continuous:
            return dict(self.config["action_space"])
        return {"kind": "discrete", "n": self.n_actions, "encoding": self.config.get("action_encoding")}

    def _continuous_only(self, what: str) -> None:
        if not self.is_continuous:
            raise PolicyError(f"{self.path}: {what} is for continuous policies; this one has {self.n_actions} "
                              "discrete actions (use select_action or action_probs)")

    def _discrete_only(self, what: str) -> None:
        if self.is_continuous:
            space = self.action_space
            raise PolicyError(f"{self.path}: {what} is for discrete policies; this one gives a continuous "
                              f"{space.get('name')} in {space.get('unit')} (use select_action)")

    def action_mean(self, obs: Any) -> jnp.ndarray:
        """The continuous action of the policy's mean, in the action space's unit: (,) or (B,)."""
        self._continuous_only("action_mean")
        z = self.outputs_of(obs)[..., 0]
        space = self.action_space
        low, high = float(space["low"]), float(space["high"])
        return jnp.clip(low + 0.5 * (jnp.tanh(z) + 1.0) * (high - low), low, high)

    def _obs(self, obs: Any) -> jnp.ndarray:
        obs = jnp.asarray(obs, jnp.float32)
        if obs.ndim not in (1, 2) or obs.shape[-1] != self.obs_dim:
            raise PolicyError(
                f"{self.path}: obs has shape {tuple(obs.shape)}; this policy takes ({self.obs_dim},) or "
                f"(batch, {self.obs_dim}) ({', '.join(self.config.get('feature_names', [])[:3])}, ...)"
            )
        return obs

    def _mask(self, action_mask: Any, shape: tuple[int, ...]) -> jnp.ndarray | None:
        if action_mask is None:
            return None
        mask = jnp.asarray(action_mask, bool)
        if mask.shape != shape:
            raise PolicyError(f"{self.path}: action_mask has shape {tuple(mask.shape)}; expected {shape}")
        return mask

    def outputs_of(self, obs: Any) -> jnp.ndarray:
        """The network's raw output (Q-values or logits), (A,) or (B, A)."""
        return network_forward(self.tensors, self.config["network"], self._obs(obs))

    def action_probs(self, obs: Any, action_mask: Any = None) -> jnp.ndarray:
        """pi(.|obs): one-hot of the admissible argmax for Q-values, the (masked) softmax for logits."""
        self._discrete_only("action_probs")
        out = self.outputs_of(obs)
        mask = self._mask(action_mask, out.shape)
        if mask is not None:
            out = jnp.where(mask.any(-1, keepdims=True) & ~mask, -jnp.inf, out)
        if self.outputs == "q_values":
            return jax.nn.one_hot(jnp.argmax(out, axis=-1), self.n_actions, dtype=jnp.float32)
        return jax.nn.softmax(out, axis=-1)

    def select_action(self, obs: Any, action_mask: Any = None) -> int | float | np.ndarray:
        """The most probable action: an int for one state, an int array for a batch. A continuous policy
        gives its mean action in physical units (a float, or a float array for a batch)."""
        if self.is_continuous:
            if action_mask is not None:
                raise PolicyError(f"{self.path}: a continuous policy takes no action_mask")
            dose = np.asarray(self.action_mean(obs), np.float64)
            return float(dose) if dose.ndim == 0 else dose
        probs = self.action_probs(obs, action_mask)
        actions = np.asarray(jnp.argmax(probs, axis=-1), np.int64)
        return int(actions) if actions.ndim == 0 else actions

    def decode_action(self, action: int) -> dict[str, Any]:
        """Vasopressor and fluid levels of an action and, where the data define them, their dose ranges."""
        self._discrete_only("decode_action")
        action = int(action)
        if not 0 <= action < self.n_actions:
            raise PolicyError(f"{self.path}: action {action} outside 0..{self.n_actions - 1}")
        fluid_level, vaso_level = divmod(action, N_LEVELS)
        decoded: dict[str, Any] = {"action": action, "vaso_level": vaso_level, "fluid_level": fluid_level}
        bins = self.action_bins
        if not bins:
            decoded["note"] = (
                "levels only: this policy's data (ICU-Sepsis) ship no dose edges; level 0 is none and "
                "1-4 are quartiles of non-zero doses in the AI Clinician cohort"
            )
            return decoded
        decoded["vaso_range"] = level_range(vaso_level, bins.get("vaso_edges", []))
        decoded["vaso_unit"] = bins.get("vaso_unit")
        decoded["fluid_range"] = level_range(fluid_level, bins.get("fluid_edges", []))
        decoded["fluid_unit"] = bins.get("fluid_unit")
        return decoded

    def check_inputs(
        self,
        obs_dim: int | None = None,
        feature_names: list[str] | None = None,
        normalisation: Any = None,
        source: str = "the given inputs",
    ) -> None:
        """Raise PolicyError naming the first difference between this checkpoint and the inputs."""
        if obs_dim is not None and int(obs_dim) != self.obs_dim:
            raise PolicyError(f"{self.path}: the checkpoint takes obs_dim {self.obs_dim} but {source} has {obs_dim}")
        if feature_names is not None:
            mine = list(self.config.get("feature_names") or [])
            theirs = list(feature_names)
            if mine != theirs:
                diff = next(
                    (i for i, (x, y) in enumerate(zip(mine, theirs, strict=False)) if x != y), min(len(mine), len(theirs))
                )
                got = theirs[diff] if diff < len(theirs) else "<none>"
                want = mine[diff] if diff < len(mine) else "<none>"
                raise PolicyError(
                    f"{self.path}: feature {diff} is {want!r} in the checkpoint but {got!r} in {source} "
                    f"({len(mine)} vs {len(theirs)} features); the policy would read the wrong inputs"
                )
        if normalisation is not None and "normalisation" in self.config:
            if not _same(self.config["normalisation"], normalisation):
                raise PolicyError(
                    f"{self.path}: normalisation differs from {source} "
                    f"({_first_difference(self.config['normalisation'], normalisation)}); "
                    "the policy was trained on differently scaled inputs"
                )


def level_range(level: int, edges: list[float]) -> tuple[float, float] | None:
    """Dose range of a level: 0 -> (0, 0); 1..4 -> (edge below, edge above), inf above the last edge."""
    if level == 0:
        return (0.0, 0.0)
    if len(edges) != N_LEVELS - 2:
        return None
    bounds = [0.0, *map(float, edges), float("inf")]
    return (bounds[level - 1], bounds[level])


def load_policy(
    path: str | os.PathLike,
    replay: Any = None,
    *,
    feature_names: list[str] | None = None,
    normalisation: Any = None,
    obs_dim: int | None = None,
) -> Policy:
    """Load a checkpoint folder. `replay` (a `Replay`, or its metadata dict) or the keyword arguments
    give the inputs the policy will see; they are checked against the checkpoint, and a mismatch
    raises PolicyError saying what differs."""
    tensors, config = load_checkpoint(path)
    # device_put, not jnp.asarray: the latter compiles an identity program per tensor shape
    policy = Policy(Path(path), {k: jax.device_put(v) for k, v in tensors.items()}, config)
    source = "the given inputs"
    if replay is not None:
        meta = replay if isinstance(replay, dict) else replay.meta
        source = f"replay {getattr(replay, 'path', None) or meta.get('source', '<metadata>')}"
        obs_dim = meta.get("obs_dim") if obs_dim is None else obs_dim
        feature_names = meta.get("feature_names") if feature_names is None else feature_names
        normalisation = meta.get("normalisation") if normalisation is None else normalisation
        from cleansepsis.replay import action_space_of, describe_action_space

        space = action_space_of(meta)
        if (space.get("kind") == "continuous") != policy.is_continuous:
            raise PolicyError(
                f"{policy.path}: the policy gives {describe_action_space(policy.action_space)} but {source} has "
                f"{describe_action_space(space)}"
            )
        if not policy.action_bins and meta.get("action_bins"):
            policy = Policy(policy.path, policy.tensors, {**config, "action_bins": meta["action_bins"]})
    _check_bins(policy.path, policy.action_bins)
    policy.check_inputs(obs_dim, feature_names, normalisation, source)
    return policy


def _check_bins(path: Path, bins: Any) -> None:
    """Dose edges, where given, are increasing finite numbers: decode_action reads them."""
    if bins is None:
        return
    if not isinstance(bins, dict):
        raise PolicyError(
            f"{path}: action_bins is {bins!r}; expected an object with vaso_edges and fluid_edges"
        )
    for key in ("vaso_edges", "fluid_edges"):
        edges = bins.get(key, [])
        numbers = isinstance(edges, list) and all(
            isinstance(x, int | float) and not isinstance(x, bool) and np.isfinite(x) for x in edges
        )
        if not numbers or any(b < a for a, b in itertools.pairwise(edges)):
            raise PolicyError(f"{path}: action_bins {key} is {edges!r}; expected increasing finite numbers")
