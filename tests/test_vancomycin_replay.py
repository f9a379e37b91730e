"""`data_prep.py vancomycin-sim`: a continuous-dose replay of the simulator, byte-reproducible, with the exact
behaviour log densities and the simulator's parameters in the metadata."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import data_prep
from cleansepsis import vancomycin as V
from cleansepsis.replay import load_replay
from cleansepsis.vancomycin_replay import simulator_params_from_meta


def _write(path, *extra):
    return data_prep.main(["vancomycin-sim", "--episodes", "40", "--seed", "3", "--out", str(path), *extra])


def test_same_seed_same_bytes_and_a_valid_continuous_replay(tmp_path):
    assert _write(tmp_path / "a.parquet", "--val-frac", "0.25", "--test-frac", "0.25") == 0
    assert _write(tmp_path / "b.parquet", "--val-frac", "0.25", "--test-frac", "0.25") == 0
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    replay = load_replay(tmp_path / "a.parquet")
    assert replay.is_continuous and replay.meta["env_id"] == V.ENV_ID
    assert replay.action_space == {"kind": "continuous", "name": "vancomycin_dose", "unit": "mg", "low": 0.0,
                                   "high": 3000.0}
    assert replay.data.size == 40 * V.N_DECISIONS and replay.meta["n_episodes"] == 40
    assert {name: replay.split(name).size // V.N_DECISIONS for name in ("train", "val", "test")} == {
        "train": 20, "val": 10, "test": 10}
    dose = np.asarray(replay.data.action)
    assert dose.dtype == np.float32 and (dose > 0).all() and (dose <= 3000).all()
    # the stored density is the behaviour policy's at the stored dose and observation
    density = jax.jit(jnp.vectorize(V.clinician_log_density, signature="(d),()->()"))  # one program, not eager ops
    expected = np.asarray(density(replay.data.obs, dose))
    np.testing.assert_allclose(np.asarray(replay.data.behavior_log_density), expected, rtol=1e-4, atol=1e-4)
    assert simulator_params_from_meta(replay.meta) == V.VancoParams()
    # another seed draws other patients
    assert _write(tmp_path / "c.parquet") == 0
    other = load_replay(tmp_path / "c.parquet")
    assert other.content_hash != replay.content_hash


@pytest.mark.parametrize("flags, message", [
    (["--episodes", "0"], "--episodes must be at least 1"),
    (["--val-frac", "0.7", "--test-frac", "0.7"], "at most 1"),
])
def test_bad_arguments_give_one_error_and_no_file(tmp_path, capsys, flags, message):
    out = tmp_path / "x.parquet"
    status = data_prep.main(["vancomycin-sim", "--out", str(out), "--episodes", "10", *flags])
    assert status == 1 and message in capsys.readouterr().err and not out.exists()
