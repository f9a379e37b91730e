"""Model cards of continuous-dose policies (cleansepsis.model_card.continuous_model_card): dose unit and bounds,
the data source, the research-only notice, and none of the discrete cards' ICU-Sepsis or 5 x 5 text."""

from __future__ import annotations

import json

import pytest

from cleansepsis.io import write_json
from cleansepsis.model_card import NOTICE, model_card, write_continuous_run_cards

SPACE = {"kind": "continuous", "name": "vancomycin_dose", "unit": "mg", "low": 0.0, "high": 3000.0}


def config(source: str = "vancomycin-sim", **extra) -> dict:
    return {
        "algo": "iql_continuous", "setting": 1, "seed": 3, "hparams": {"tau": 0.7, "beta": 3.0}, "updates": 50,
        "network": {"kind": "mlp", "activation": "relu"}, "obs_dim": 14, "n_actions": 0, "outputs": "action_mean",
        "action_space": SPACE, "replay_path": "v.parquet", "replay_hash": "ab" * 32, "replay_source": source,
        "env_id": "CleanSepsis/Vancomycin-v0" if source == "vancomycin-sim" else None,
        "feature_names": ["age", "weight"], "normalisation": "none: physical units", **extra,
    }  # fmt: skip


def test_continuous_card_has_dose_unit_bounds_source_and_notice_and_no_discrete_text():
    text = model_card(config(), None, {})
    assert text.startswith("# Model card: iql_continuous policy (continuous dose), setting 1, seed 3")
    assert text.count(NOTICE) == 2  # at the top and at the end
    assert "vancomycin_dose in mg, bounds [0, 3000] mg" in text
    assert "simulated patients, not people" in text and "Goti et al. 2018" in text
    assert "not run yet" in text
    for discrete in ("ICU-Sepsis", "5 * fluid_level", "5 x 5", "action_heatmap", "vasopressor"):
        assert discrete not in text
    mimic = model_card(config("mimic-iv"), None, {})
    assert "MIMIC-IV" in mimic and "simulated patients" not in mimic and "ICU-Sepsis" not in mimic
    assert "`elsewhere` (not one this card knows" in model_card(config("elsewhere"), None, {})


def evaluation_entry() -> dict:
    nan = float("nan")
    undefined = {"estimate": nan, "ci_low": nan, "ci_high": nan, "undefined": "deterministic"}
    return {
        "name": "s1_seed3", "acting": "mean", "checkpoint": "checkpoints/s1_seed3",
        "ope": {"estimators": {"wis": undefined, "pdwis": undefined, "wdr": undefined,
                               "fqe": {"estimate": 4.61, "ci_low": 4.5, "ci_high": 4.72}},
                "n_episodes": 200, "n_transitions": 1600, "gamma": 1.0, "observed_return": 4.4,
                "undefined": "the target is deterministic", "warnings": []},
        "doses": {"policy_mean": 1210.0, "logged_mean": 1180.0, "mean_abs_difference": 150.0, "median_ratio": 1.02,
                  "within_20_percent": 0.8},
        "simulated": {"value": 4.7, "stderr": 0.013, "n_patients": 1000},
    }  # fmt: skip


def test_continuous_card_reports_the_off_policy_estimates_the_simulation_and_the_doses():
    run = {"split": "test", "replay_path": "v.parquet", "reward": "AUC24 in 400-600",
           "simulation": {"value": 5.1, "stderr": 0.01, "n_patients": 100_000, "clinician": 4.4, "oracle": 7.6}}
    text = model_card(config(), evaluation_entry(), run)
    assert "| FQE | 4.610 [4.500, 4.720] |" in text and "| WIS | undefined |" in text
    assert "| simulated (Monte Carlo, 1000 patients) | 4.7000 +- 0.0130 (SE) |" in text
    assert "**5.1000 +- 0.0100** (SE)" in text and "clinician-like policy 4.4000 and the oracle 7.6000" in text
    assert "Importance sampling undefined: the target is deterministic." in text
    assert "mean 1210.0 mg (logged 1180.0)" in text and "80.0% within 20%" in text
    assert "AUC24 in 400-600" in text and "Warnings: none fired." in text


def test_run_cards_go_to_final_checkpoints_with_their_simulated_value(tmp_path):
    summary = {"seeds": [3, 4], "updates_per_policy": 50, "replay": {},
               "simulation": {"n_patients": 500, "value": [[1.0, 2.0], [3.0, 4.0]],
                              "stderr": [[0.1, 0.2], [0.3, 0.4]], "clinician": {"value": 4.4},
                              "oracle": {"value": 7.6}}}  # fmt: skip
    write_json(tmp_path / "summary.json", summary)
    for name, extra in (("s1_seed4", {"seed": 4}), ("s1_seed4_u0000010", {"seed": 4, "updates": 10})):
        (tmp_path / "checkpoints" / name).mkdir(parents=True)
        (tmp_path / "checkpoints" / name / "config.json").write_text(json.dumps(config(**extra)))
    written = write_continuous_run_cards(tmp_path)
    assert [p.parent.name for p in written] == ["s1_seed4"]
    text = (tmp_path / "checkpoints" / "s1_seed4" / "README.md").read_text()
    assert "500 simulated patients): **4.0000 +- 0.4000** (SE)" in text  # setting 1, seed 4 -> [1][1]
    assert not (tmp_path / "checkpoints" / "s1_seed4_u0000010" / "README.md").exists()


@pytest.mark.parametrize("source", ["vancomycin-sim", "mimic-iv"])
def test_discrete_card_is_unchanged_for_a_discrete_config(source):
    discrete = {**config(source), "outputs": "q_values", "n_actions": 25, "action_space": None}
    assert "5 * fluid_level + vaso_level" in model_card(discrete, None, {})
