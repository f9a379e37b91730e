"""`python -m cleansepsis.evaluate` on small run folders built here: outputs, exact values, errors."""

from __future__ import annotations

import json

import equinox as eqx
import jax
import numpy as np
import polars as pl
import pytest

from cleansepsis import env
from cleansepsis.checkpoint import linear_layers, save_checkpoint
from cleansepsis.evaluate import main
from cleansepsis.icu_replay import make_clinician_replay
from cleansepsis.replay import write_replay


@pytest.fixture(scope="module")
def icu_replay(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "icu.parquet"
    # 150 test episodes: the size of the fresh held-out set below, so both evaluate on the same shapes and
    # share their compiled programs; 250 episodes in all: every replay of this module has at most 256, so
    # all share one compiled clinician rollout (a batch of 256 envs, cleansepsis.mdp.rollout_episodes)
    frame, meta = make_clinician_replay(250, seed=1, test_frac=0.6)
    write_replay(path, frame, meta)
    return path, frame, meta


def make_run(folder, replay_path, meta, outputs=("q_values", "logits")):
    runs = []
    for i, kind in enumerate(outputs):
        mlp = eqx.nn.MLP(meta["obs_dim"], 25, 16, 1, key=jax.random.key(i))
        rel = f"checkpoints/s0_seed{i}"
        config = {
            "network": {"kind": "mlp", "activation": "relu", "hidden": ["h0"], "output": "out"},
            "outputs": kind, "obs_dim": meta["obs_dim"], "n_actions": 25,
            "feature_names": meta["feature_names"], "normalisation": meta["normalisation"],
            "replay_path": str(replay_path), "replay_source": meta["source"], "env_id": meta["env_id"],
            "action_bins": meta.get("action_bins"), "algo": "test", "hparams": {}, "seed": i, "setting": 0,
        }  # fmt: skip
        save_checkpoint(folder / rel, linear_layers(mlp, ["h0", "out"]), config)
        runs.append({"setting": 0, "seed": i, "hparams": {}, "checkpoint": rel})
    (folder / "summary.json").write_text(json.dumps({"algo": "test", "runs": runs}))
    return folder


def test_evaluates_every_policy_with_exact_values_figures_and_model_cards(icu_replay, tmp_path, capsys):
    replay_path, _, meta = icu_replay
    run = make_run(tmp_path / "run", replay_path, meta)
    assert main([str(run), "--n-boot", "10", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    names = [p["name"] for p in report["policies"]]
    assert names == ["clinicians", "s0_seed0", "s0_seed1"]
    exact_clinician = env.reference_values(env.load_params())["clinician_renormalised"]["expected_return"]
    clin = report["policies"][0]
    assert clin["exact"]["value"] == pytest.approx(exact_clinician, abs=1e-4)
    # on-policy: every weight is 1 (softening by 0.01 moves them only slightly)
    assert clin["ope"]["weights"]["ess"] > 0.95 * clin["ope"]["n_episodes"]
    for p in report["policies"][1:]:
        assert p["exact"] is not None and 0 < p["exact"]["value"] < 1
        for name in ("wis", "pdwis", "wdr", "fqe"):
            est = p["ope"]["estimators"][name]
            assert not np.isfinite(est["estimate"]) or est["ci_low"] <= est["estimate"] + 1e-6
        assert 0 <= p["safety"]["agreement"]["action"] <= 1
        assert p["safety"]["support"] is not None
    # a greedy policy restricted to admissible actions never picks an inadmissible one
    assert report["policies"][1]["safety"]["inadmissible_rate"] == 0.0
    for name in ("evaluation.json", "evaluation.md", "action_heatmap.png", "q_values.png", "forest.png"):
        assert (run / name).stat().st_size > 0
    card = (run / "checkpoints/s0_seed0/README.md").read_text()
    assert "not for treating patients" in card and "WIS" in card
    # the clinicians' observed return beside every estimate, the warnings and their thresholds
    observed = report["observed_return"]
    assert observed["n_episodes"] == 150 and observed["ci_low"] <= observed["mean"] <= observed["ci_high"]
    assert report["thresholds"]["small_held_out_episodes"] == 100
    # the card writes the observed mean to 4 decimals
    assert f"{observed['mean']:.4f}" in card and "clinicians observed" in card and "Thresholds" in card
    markdown = (run / "evaluation.md").read_text()
    assert "clinicians observed" in markdown and "### Warnings" in markdown
    assert report["policies"][0]["ope"]["warnings"] == []  # the clinicians on 150 episodes: nothing to flag
    assert report["behavior"]["calibration"]["ece"] < 0.1  # the true behaviour model, checked on held-out data
    assert "ICU-Sepsis is a model of MIMIC-III patients" in card
    assert json.loads((run / "evaluation.json").read_text())["policies"][1]["name"] == "s0_seed0"
    # existing outputs are kept unless asked
    assert main([str(run), "--n-boot", "10"]) == 2
    assert "already exists" in capsys.readouterr().err


def test_replay_without_behaviour_probabilities_needs_a_behaviour_model(icu_replay, tmp_path, capsys):
    _, frame, meta = icu_replay
    rng = np.random.default_rng(0)
    n = frame.height
    raw = frame.drop("behavior_prob", "state_index", "next_state_index").with_columns(
        pl.Series("map_mmhg", rng.uniform(40, 110, n)),
        pl.Series("cvp_mmhg", rng.uniform(0, 20, n)),
        pl.Series("cum_balance_ml", rng.uniform(0, 15_000, n)),
        pl.Series("vaso_ne_eq", np.where(frame["action"].to_numpy() % 5 > 0, rng.uniform(0.01, 1, n), 0.0)),
        pl.Series("fluid_ml", np.where(frame["action"].to_numpy() // 5 > 0, rng.uniform(10, 2000, n), 0.0)),
    )
    meta = {**meta, "source": "mimic-like test data", "step_hours": 4}
    path = tmp_path / "mimic_like.parquet"
    write_replay(path, raw, meta)
    run = make_run(tmp_path / "run", path, meta, outputs=("q_values",))
    assert main([str(run), "--n-boot", "10", "--fqe", "tabular"]) == 2
    assert "behavior_prob" in capsys.readouterr().err
    behaviour = make_run(tmp_path / "bc", path, meta, outputs=("logits",)) / "checkpoints/s0_seed0"
    args = [str(run), "--n-boot", "10", "--behavior", str(behaviour), "--json", "--fqe-iterations", "3",
            "--fqe-steps", "20", "--fqe-refits", "4"]  # fmt: skip
    assert main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["behavior"]["calibration"]["ece"] >= 0
    assert [p["name"] for p in report["policies"]] == ["s0_seed0"]
    policy = report["policies"][0]
    assert policy["exact"] is None
    assert policy["ope"]["estimators"]["fqe"]["features"].startswith("MLP")
    assert policy["ope"]["estimators"]["fqe"]["n_refits"] == 4  # the neural interval refits on resamples
    hazards = policy["safety"]["hazards"]
    assert set(hazards["policy"]) == {"A", "B", "C", "D"} and hazards["clinicians"]["A"]["n_states"] > 0
    assert "Festor" in (run / "evaluation.md").read_text()
    # not an ICU-Sepsis policy: no ICU-Sepsis lines in its model card
    card = (run / "checkpoints/s0_seed0/README.md").read_text()
    assert "ICU-Sepsis" not in card and "clinicians observed" in card


def test_small_held_out_set_is_flagged_in_tables_json_and_model_card(tmp_path, capsys):
    frame, meta = make_clinician_replay(60, seed=4, test_frac=0.1)  # 6 test episodes
    path = tmp_path / "small.parquet"
    write_replay(path, frame, meta)
    run = make_run(tmp_path / "run", path, meta, outputs=("q_values",))
    assert main([str(run), "--n-boot", "10"]) == 0
    out = capsys.readouterr().out
    assert "small-held-out-set" in out and "only 6 held-out episodes (< 100)" in out
    report = json.loads((run / "evaluation.json").read_text())
    assert report["observed_return"]["n_episodes"] == 6
    for policy in report["policies"]:
        assert "small-held-out-set" in [w["code"] for w in policy["ope"]["warnings"]]
    assert "small-held-out-set" in report["warnings"]
    card = (run / "checkpoints/s0_seed0/README.md").read_text()
    assert "**Warnings**" in card and "only 6 held-out episodes" in card
    # the intervals for small held-out sets, by name, in the JSON, the tables and the model card
    fqe = report["policies"][1]["ope"]["estimators"]["fqe"]
    low, high = fqe["ci_identified"]
    assert low <= fqe["identified_set"][0] <= fqe["identified_set"][1] <= high
    assert fqe["value_bounds"] == [0, 1]
    wdr = report["policies"][1]["ope"]["estimators"]["wdr"]
    assert [wdr["ci_low"], wdr["ci_high"]] == wdr["ci_refit"] and "FQE refitted" in wdr["interval"]
    assert len(wdr["ci_fixed_model"]) == 2 and len(wdr["ci_bootstrap_t"]) == 2 and wdr["se"] >= 0
    markdown = (run / "evaluation.md").read_text()
    assert "FQE identified interval" in markdown and f"[{low:.4f}, {high:.4f}]" in markdown
    assert "`ci_fixed_model`" in markdown and "FQE refitted on that resample" in markdown
    assert "FQE, identified interval (`ci_identified`)" in card and f"[{low:.3f}, {high:.3f}]" in card
    assert "partial identification" in card


def test_no_options_on_a_default_run_draws_a_fresh_held_out_replay(tmp_path, monkeypatch, capsys):
    """A default run trains on the cached ICU-Sepsis replay, every episode in "train": `evaluate RUN` with
    no options draws held-out clinician episodes with another seed instead of stopping."""
    from dataclasses import dataclass

    from cleansepsis import evaluate, icu_replay
    from cleansepsis.replay import load_replay

    monkeypatch.setenv("CLEANSEPSIS_CACHE", str(tmp_path / "cache"))
    replay_path = icu_replay.default_replay_path(episodes=200, seed=0)
    run = make_run(tmp_path / "run", replay_path, load_replay(replay_path).meta, outputs=("q_values",))

    @dataclass(frozen=True)
    class QuickDefaults(evaluate.Args):  # the defaults, smaller: keeps the test to seconds
        n_boot: int = 10
        heldout_episodes: int = 150

    monkeypatch.setattr(evaluate, "Args", QuickDefaults)
    assert main([str(run)]) == 0
    captured = capsys.readouterr()
    assert "fresh held-out ICU-Sepsis replay of 150 clinician episodes" in captured.err
    assert "Held-out data drawn for this evaluation" in captured.out
    report = json.loads((run / "evaluation.json").read_text())
    heldout = report["replay"]["heldout"]
    assert heldout["drawn"] and heldout["seed"] == evaluate.HELDOUT_SEED_OFFSET and heldout["episodes"] == 150
    assert report["observed_return"]["n_episodes"] == 150 and report["policies"][1]["exact"] is not None
    assert "Held-out data drawn" in (run / "checkpoints/s0_seed0/README.md").read_text()
    # the held-out episodes are not the training ones
    held = load_replay(heldout["path"])
    assert held.meta["args"]["seed"] != load_replay(replay_path).meta["args"]["seed"]
    assert held.content_hash != load_replay(replay_path).content_hash


def test_missing_run_folder_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "not a run folder" in capsys.readouterr().err
