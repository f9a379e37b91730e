"""`python -m cleansepsis.evaluate` on a continuous-dose (vancomycin simulator) replay: FQE, IS only where
defined, simulated true values, warnings, and one clear error for a wrong-kind policy or option."""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleansepsis import evaluate_continuous
from cleansepsis import vancomycin as V
from cleansepsis.evaluate import Args, EvaluationError, main
from cleansepsis.replay import write_replay
from cleansepsis.vancomycin_replay import VancomycinSimArgs, make_vancomycin_replay

# a small explicit FQE fit (the default, the validated history fit, takes minutes per policy); the history
# lags stay at their default (7); one sampled dose: every target shares one compiled FQE program; as many
# simulated patients as the replay has episodes: the clinicians' simulation reuses the replay's rollout program
FAST = ["--continuous-fqe-iterations", "2", "--continuous-fqe-steps", "20", "--continuous-fqe-hidden", "16",
        "--continuous-fqe-refits", "2", "--n-boot", "20", "--action-samples", "1", "--sim-patients", "120"]


@dataclass(frozen=True)
class RulePolicy:
    """Stands in for a loaded continuous checkpoint (cleansepsis.policy.Policy): the clinician rule's dose."""

    path: Path
    config: dict[str, Any]
    is_continuous: bool = True
    n_actions: int = 0

    def action_mean(self, obs):  # (B, obs_dim) -> (B,) mg
        return jnp.clip(jax.vmap(V.clinician_rule_dose)(obs), 0.0, V.DOSE_MAX_MG)


@pytest.fixture(scope="module")
def vanco_replay(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "vanco.parquet"
    frame, meta = make_vancomycin_replay(VancomycinSimArgs(out=path, episodes=120, seed=2, test_frac=0.5))
    write_replay(path, frame, meta)
    return path


def make_run(folder: Path, n: int = 1) -> Path:
    runs = [{"setting": 0, "seed": i, "hparams": {}, "checkpoint": f"checkpoints/s0_seed{i}"} for i in range(n)]
    folder.mkdir(parents=True)
    (folder / "summary.json").write_text(json.dumps({"algo": "test", "runs": runs}))
    return folder


def test_continuous_replay_gets_fqe_simulated_values_and_no_is_for_a_deterministic_policy(
    vanco_replay, tmp_path, monkeypatch, capsys
):
    monkeypatch.setattr(evaluate_continuous, "load_policy",
                        lambda path, replay: RulePolicy(Path(path), {"algo": "rule", "seed": 0}))  # fmt: skip
    run = make_run(tmp_path / "run")  # a policy stub with no checkpoint files, so no model card to write
    assert main([str(run), "--replay", str(vanco_replay), "--json", "--no-model-cards", *FAST]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["action_space"]["kind"] == "continuous"
    assert [p["name"] for p in report["policies"]] == ["clinicians", "s0_seed0"]
    clinicians, rule = report["policies"]
    # the logged behaviour: stochastic with a known density, so IS is defined and its weights are all 1
    assert clinicians["ope"]["undefined"] is None
    assert clinicians["ope"]["estimators"]["wis"]["estimate"] == pytest.approx(report["observed_return"]["mean"],
                                                                                abs=1e-4)  # fmt: skip
    # the checkpoint acts by its mean dose: FQE only, and the report says why
    assert "deterministic" in rule["ope"]["undefined"] and rule["ope"]["weights"] is None
    assert np.isfinite(rule["ope"]["estimators"]["fqe"]["estimate"])
    assert not np.isfinite(rule["ope"]["estimators"]["wis"]["estimate"])
    for p in report["policies"]:
        assert p["simulated"]["n_patients"] == 120 and np.isfinite(p["simulated"]["value"])
        # 60 held-out episodes: the same small-data warning as the discrete path
        assert [w["code"] for w in p["ope"]["warnings"]][:1] == ["small-held-out-set"]
    assert rule["doses"]["within_20_percent"] > 0.5  # the rule is the clinicians' dose without the noise
    assert report["observed_return"]["n_episodes"] == 60
    # FQE used the episode's history by default, with the fit asked for, and every output says so
    for p in report["policies"]:
        fqe = p["ope"]["estimators"]["fqe"]
        assert (fqe["history_lags"], fqe["hidden"], fqe["n_iterations"], fqe["steps_per_iteration"],
                fqe["n_refits"]) == (7, 16, 2, 20, 2)  # fmt: skip
        assert fqe["q_inputs"].startswith("observation + history") and "7 previous (obs, dose) steps" in fqe["q_inputs"]
    assert report["settings"]["continuous_fqe_history_lags"] == 7
    markdown = (run / "evaluation.md").read_text()
    assert "simulated (MC +- SE)" in markdown and "Importance sampling undefined" in markdown
    assert "FQE's Q inputs: **observation + history: the episode's 7 previous (obs, dose) steps" in markdown
    assert "| observation + history: the episode's 7 previous" in evaluate_continuous.comparison_table([report])
    assert (run / "forest.png").stat().st_size > 0
    assert main([str(run), "--replay", str(vanco_replay), *FAST]) == 2
    assert "already exists" in capsys.readouterr().err


def test_a_discrete_policy_or_option_on_a_continuous_replay_is_one_clear_error(vanco_replay, tmp_path, monkeypatch,
                                                                               capsys):  # fmt: skip
    monkeypatch.setattr(evaluate_continuous, "load_policy",
                        lambda path, replay: RulePolicy(Path(path), {}, is_continuous=False, n_actions=25))  # fmt: skip
    run = make_run(tmp_path / "run")
    assert main([str(run), "--replay", str(vanco_replay), *FAST]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and err[-1].startswith("error: ") and "a discrete policy (25 actions)" in err[-1]
    assert not (run / "evaluation.json").exists()
    for option in (["--fqe", "tabular"], ["--behavior", str(tmp_path)]):
        assert main([str(run), "--replay", str(vanco_replay), *option, *FAST]) == 2
        assert "continuous" in capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize(("option", "message"), [
    (["--continuous-fqe-history-lags", "-1"], "--continuous-fqe-history-lags must be an integer >= 0, got -1"),
    (["--continuous-fqe-hidden", "0"], "--continuous-fqe-hidden must be an integer >= 1, got 0"),
    (["--continuous-fqe-iterations", "0"], "--continuous-fqe-iterations must be an integer >= 1, got 0"),
    (["--continuous-fqe-steps", "-5"], "--continuous-fqe-steps must be an integer >= 1, got -5"),
    (["--continuous-fqe-refits", "-1"], "--continuous-fqe-refits must be an integer >= 0, got -1"),
    # the discrete neural FQE's options would be silently ignored on continuous doses
    (["--fqe-iterations", "3"], "--fqe-iterations 3: an option of the discrete neural FQE; .* takes "
                                "--continuous-fqe-iterations"),
    (["--fqe-refits", "3"], "--fqe-refits 3: an option of the discrete neural FQE; .* takes --continuous-fqe-refits"),
])  # fmt: skip
def test_a_bad_continuous_fqe_option_is_one_clear_error_before_anything_is_loaded_or_fitted(
    vanco_replay, tmp_path, monkeypatch, capsys, option, message
):
    def never(*args, **kwargs):
        raise AssertionError("a policy was loaded or a fit started before the options were checked")

    monkeypatch.setattr(evaluate_continuous, "load_policy", never)
    monkeypatch.setattr(evaluate_continuous.oc, "continuous_off_policy_evaluation", never)
    run = make_run(tmp_path / "run")
    assert main([str(run), "--replay", str(vanco_replay), *FAST, *option]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.fullmatch(f"error: {message}", err[0])
    assert not list(run.glob("evaluation.*"))


def test_continuous_fqe_options_on_a_discrete_replay_are_one_clear_error_and_the_defaults_pass():
    discrete = SimpleNamespace(is_continuous=False, path=Path("icu.parquet"))
    continuous = SimpleNamespace(is_continuous=True, path=Path("vanco.parquet"))
    args = Args(run_dirs=(Path("run"),))
    for replay in (discrete, continuous):
        evaluate_continuous.check_fqe_options(args, replay)  # the defaults fit either kind
    with pytest.raises(EvaluationError, match=r"--continuous-fqe-history-lags 0: an option of continuous FQE; "
                                              r"icu.parquet has discrete actions"):  # fmt: skip
        evaluate_continuous.check_fqe_options(dataclasses.replace(args, continuous_fqe_history_lags=0), discrete)
    # the evaluate defaults are ContinuousFQEConfig's (the validated history fit), 5 refits
    config = evaluate_continuous.fqe_config(args)
    assert config == evaluate_continuous.oc.ContinuousFQEConfig() and config.history_lags == 7
    assert args.continuous_fqe_refits == 5
    observation_only = evaluate_continuous.fqe_config(dataclasses.replace(args, continuous_fqe_history_lags=0))
    assert observation_only.history_lags == 0 and observation_only.hidden == 256


def test_help_documents_the_continuous_fqe_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())  # tyro draws a box around the options
    for option in ("--continuous-fqe-history-lags", "--continuous-fqe-hidden", "--continuous-fqe-iterations",
                   "--continuous-fqe-steps", "--continuous-fqe-refits"):
        assert option in text
    assert "0: Q on the observation only" in text and "about 3.5 min per policy" in text


def test_a_saved_continuous_checkpoint_is_evaluated_through_load_policy(vanco_replay, tmp_path, capsys):
    import equinox as eqx

    from cleansepsis.checkpoint import linear_layers, save_checkpoint
    from cleansepsis.replay import load_replay

    meta = load_replay(vanco_replay).meta
    run = make_run(tmp_path / "run")
    mlp = eqx.nn.MLP(meta["obs_dim"], 1, 8, 1, key=jax.random.key(0))
    config = {
        "network": {"kind": "mlp", "activation": "relu", "hidden": ["h0"], "output": "out"},
        "outputs": "action_mean", "obs_dim": meta["obs_dim"], "n_actions": 0, "action_space": meta["action_space"],
        "feature_names": meta["feature_names"], "normalisation": meta["normalisation"], "algo": "test",
        "replay_path": str(vanco_replay), "hparams": {}, "seed": 0, "setting": 0,
    }  # fmt: skip
    save_checkpoint(run / "checkpoints/s0_seed0", linear_layers(mlp, ["h0", "out"]), config)
    assert main([str(run), "--replay", str(vanco_replay), "--json", "--sim-patients", "0", *FAST[:-2]]) == 0
    policy = json.loads(capsys.readouterr().out)["policies"][-1]
    assert policy["name"] == "s0_seed0" and policy["simulated"] is None  # --sim-patients 0: no simulation
    assert np.isfinite(policy["ope"]["estimators"]["fqe"]["estimate"]) and "deterministic" in policy["ope"]["undefined"]
    assert 0.0 <= policy["doses"]["policy_mean"] <= V.DOSE_MAX_MG
    # the continuous model card, with this evaluation's FQE estimate
    card = (run / "checkpoints/s0_seed0/README.md").read_text()
    fqe = policy["ope"]["estimators"]["fqe"]
    assert "(continuous dose)" in card and "vancomycin_dose in mg, bounds [0, 3000] mg" in card
    assert f"| FQE | {fqe['estimate']:.3f} [{fqe['ci_low']:.3f}, {fqe['ci_high']:.3f}] |" in card
    assert "| WIS | undefined |" in card and "ICU-Sepsis" not in card and card.count("For research only") == 2
    # which Q inputs the estimate came from, and the validation of that fit (not the observation-only one's)
    assert "FQE's Q inputs: observation + history: the episode's 7 previous (obs, dose) steps" in card
    assert "FQE fits Q on the observation and the episode's history (the default)" in card
    assert "FQE on the observation alone" not in card
