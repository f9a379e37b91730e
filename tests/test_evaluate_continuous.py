"""`python -m cleansepsis.evaluate` on a continuous-dose (vancomycin simulator) replay: FQE, IS only where
defined, simulated true values, warnings, and one clear error for a wrong-kind policy or option."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleansepsis import evaluate_continuous
from cleansepsis import vancomycin as V
from cleansepsis.evaluate import main
from cleansepsis.replay import write_replay
from cleansepsis.vancomycin_replay import VancomycinSimArgs, make_vancomycin_replay

FAST = ["--fqe-iterations", "2", "--fqe-steps", "20", "--fqe-refits", "2", "--n-boot", "20", "--action-samples", "1",
        "--sim-patients", "200"]  # one sampled dose: every target shares one compiled FQE program


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
        assert p["simulated"]["n_patients"] == 200 and np.isfinite(p["simulated"]["value"])
        # 60 held-out episodes: the same small-data warning as the discrete path
        assert [w["code"] for w in p["ope"]["warnings"]][:1] == ["small-held-out-set"]
    assert rule["doses"]["within_20_percent"] > 0.5  # the rule is the clinicians' dose without the noise
    assert report["observed_return"]["n_episodes"] == 60
    markdown = (run / "evaluation.md").read_text()
    assert "simulated (MC +- SE)" in markdown and "Importance sampling undefined" in markdown
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
