"""`python -m cleansepsis.select`: selection among candidates whose exact values are known, the batched
estimators against cleansepsis.ope one candidate at a time, regret and Spearman by hand, the CLI."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cleansepsis import env, ope
from cleansepsis import select as S
from cleansepsis.checkpoint import save_checkpoint
from cleansepsis.icu_replay import make_clinician_replay
from cleansepsis.replay import load_replay, write_replay


@pytest.fixture(scope="module")
def params():
    return env.load_params()


@pytest.fixture(scope="module")
def icu_replay(tmp_path_factory):
    path = tmp_path_factory.mktemp("replay") / "icu.parquet"
    frame, meta = make_clinician_replay(2400, seed=3, val_frac=0.5)
    write_replay(path, frame, meta)
    return path, meta


def table_network(table: np.ndarray, params) -> tuple[dict[str, np.ndarray], dict]:
    """An MLP 47 -> 716 -> 25 whose greedy action over admissible actions is the argmax of `table` in every
    ICU-Sepsis patient state: fixed random ReLU features of the 716 state vectors (full rank up to repeated
    vectors), then the output layer solved by least squares to reproduce the table."""
    states = np.asarray(params.state_vectors, np.float64)
    rng = np.random.default_rng(0)
    w1 = rng.normal(size=(716, states.shape[1])) / np.sqrt(states.shape[1])
    b1 = rng.normal(size=716)
    hidden = np.maximum(states @ w1.T + b1, 0.0)
    w2 = np.linalg.lstsq(hidden, np.asarray(table, np.float64), rcond=None)[0]
    tensors = {"h.weight": w1, "h.bias": b1, "o.weight": w2.T, "o.bias": np.zeros(25)}
    network = {"kind": "mlp", "activation": "relu", "hidden": ["h"], "output": "o"}
    return {k: np.asarray(v, np.float32) for k, v in tensors.items()}, network


def known_tables(params) -> dict[str, np.ndarray]:
    """Deterministic policies (716, 25) far apart in value: optimal, half optimal / half greedy clinician,
    greedy clinician, and always the highest admissible fluid level."""
    optimal = np.asarray(env.optimal_policy(params))
    clinician = np.asarray(env.greedy_admissible(env.clinician_policy(params), params.admissible_mask))
    half = np.where((np.arange(716) % 2 == 0)[:, None], optimal, clinician)
    prefer = np.zeros((716, 25))
    prefer[:, 10] = 1.0
    constant = np.asarray(env.greedy_admissible(jnp.asarray(prefer), params.admissible_mask))
    return {"optimal": optimal, "half": half, "clinician": clinician, "constant": constant}


def make_run(folder, replay_path, meta, params, tables: dict[str, np.ndarray], with_summary: bool = True):
    """A run folder in the --save-every layout: policy 0's final checkpoint and one intermediate, policy
    1's likewise; each checkpoint acts by one of `tables`."""
    names = list(tables)
    layout = [("checkpoints/s0_seed0", 200), ("checkpoints/s0_seed0_u0000100", 100),
              ("checkpoints/s1_seed0", 200), ("checkpoints/s1_seed0_u0000100", 100)][: len(names)]  # fmt: skip
    runs = {}
    for (rel, updates), name in zip(layout, names, strict=True):
        tensors, network = table_network(tables[name], params)
        setting = int(rel.split("/")[1][1])
        config = {
            "network": network, "outputs": "q_values", "obs_dim": meta["obs_dim"], "n_actions": 25,
            "feature_names": meta["feature_names"], "normalisation": meta["normalisation"],
            "replay_path": str(replay_path), "replay_source": meta["source"], "env_id": meta["env_id"],
            "replay_hash": load_replay(replay_path).content_hash, "algo": f"test-{name}",
            "hparams": {"x": float(setting)}, "seed": 0, "setting": setting, "updates": updates,
        }  # fmt: skip
        save_checkpoint(folder / rel, tensors, config)
        entry = runs.setdefault(setting, {"setting": setting, "seed": 0, "hparams": {"x": float(setting)},
                                          "checkpoints": []})  # fmt: skip
        entry["checkpoints"].append({"updates": updates, "checkpoint": rel})
        if "_u" not in rel:
            entry["checkpoint"] = rel
    if with_summary:
        summary = {"algo": "test", "updates_per_policy": 200, "runs": list(runs.values())}
        (folder / "summary.json").write_text(json.dumps(summary))
    return folder


def exact_of(table: np.ndarray, params) -> float:
    return float(env.policy_evaluation(jnp.asarray(table, jnp.float32), params)[0])


# ----------------------------------------------------------------------------------------------
# Known candidates, end to end


def test_selects_the_best_of_candidates_with_known_values(icu_replay, params, tmp_path, capsys):
    replay_path, meta = icu_replay
    tables = known_tables(params)
    truth = {k: exact_of(t, params) for k, t in tables.items()}
    assert truth["optimal"] > truth["half"] > truth["clinician"] > truth["constant"]
    run = make_run(tmp_path / "run", replay_path, meta, params, tables)
    code = S.main([str(run), "--replay", str(replay_path), "--split", "val", "--n-boot", "40", "--json",
                   "--shortlist", "2"])  # fmt: skip
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_candidates"] == 4
    assert out["selected"]["path"] == str(run / "checkpoints/s0_seed0")  # the optimal policy
    assert out["selected"]["exact_return"] == pytest.approx(truth["optimal"], abs=1e-5)
    assert out["oracle_best_exact"] == pytest.approx(truth["optimal"], abs=1e-5)
    assert out["selected"]["ci_low"] <= out["selected"]["estimate"] <= out["selected"]["ci_high"]
    for method in ("fqe", "wdr", "two-stage"):
        assert out["regret"][method] == pytest.approx(0.0, abs=1e-9), method
        assert out["spearman"][method] == pytest.approx(1.0), method
    report = json.loads((run / "selection.json").read_text())
    exact = {c["algo"]: c["exact_return"] for c in report["candidates"]}
    for name, value in truth.items():
        assert exact[f"test-{name}"] == pytest.approx(value, abs=1e-5)
    assert {c["updates"] for c in report["candidates"]} == {100, 200}
    assert (run / "selection.md").read_text().startswith("# Policy selection over 4 candidates")
    assert (run / "selection.png").read_bytes()[:4] == b"\x89PNG"
    # outputs exist: a second run refuses without --overwrite and leaves them as they were
    before = (run / "selection.json").read_bytes()
    assert S.main([str(run), "--replay", str(replay_path), "--n-boot", "40"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (run / "selection.json").read_bytes() == before


def test_candidates_without_summary_and_errors(icu_replay, params, tmp_path, capsys):
    replay_path, meta = icu_replay
    tables = known_tables(params)
    run = make_run(tmp_path / "bare", replay_path, meta, params, {"half": tables["half"]}, with_summary=False)
    assert [c.name for c in S.list_candidates([run])] == ["bare/checkpoints/s0_seed0"]
    out = tmp_path / "out"
    assert S.main([str(run), "--replay", str(replay_path), "--split", "train", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "trained on split 'train'" in err
    assert not out.exists()
    assert S.main([str(tmp_path / "missing"), "--replay", str(replay_path)]) == 2
    assert "not a run folder" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# The batched estimators equal cleansepsis.ope one candidate at a time


def test_batched_scores_match_ope_per_candidate(icu_replay, params):
    replay_path, _ = icu_replay
    replay = load_replay(replay_path)
    data = replay.split("val")
    mask = np.asarray(params.admissible_mask)
    tables = known_tables(params)
    clinician = np.asarray(env.clinician_policy(params))
    # a stochastic candidate too: some weight on every admissible action
    mixed = 0.5 * tables["half"] + 0.5 * clinician
    # four candidates and 40 resamples, as in the end-to-end test above: the module compiles the batched
    # programs (FQE fits, WIS / WDR, bootstrap counts) once for both
    candidates = [ope.soften(t, 0.01, mask) for t in (tables["optimal"], mixed, tables["clinician"],
                                                       tables["constant"])]  # fmt: skip
    stacked = np.stack(candidates).astype(np.float32)
    behaviour = np.asarray(data.behavior_prob, np.float64)
    scores = S.score_tabular(data, stacked, behaviour, gamma=1.0, clip=None, n_boot=40, key=jax.random.key(0),
                             fqe_interval_top=2, shortlist=1, fqe_boot=40)  # fmt: skip
    # scoring a candidate at a time (how large held-out sets stay within memory) changes nothing
    single = S.score_tabular(data, stacked, behaviour, gamma=1.0, clip=None, n_boot=40, key=jax.random.key(0),
                             fqe_interval_top=2, shortlist=1, fqe_boot=40, chunk=1)  # fmt: skip
    for name in ("wis", "wdr", "fqe"):
        for field in ("estimate", "ci_low", "ci_high"):
            np.testing.assert_allclose(getattr(single, field)[name], getattr(scores, field)[name], rtol=1e-6)
    np.testing.assert_allclose(single.ess, scores.ess, rtol=1e-9)
    np.testing.assert_allclose(single.max_weight, scores.max_weight, rtol=1e-9)
    # FQE intervals only for the two highest FQE estimates and the highest WIS one
    has_interval = np.isfinite(scores.ci_low["fqe"])
    assert has_interval.sum() in (2, 3)
    assert not has_interval.all()
    assert has_interval[np.argmax(scores.estimate["fqe"])]
    state, next_state = np.asarray(data.state_index), np.asarray(data.next_state_index)
    for k, table in enumerate(candidates):
        result = ope.off_policy_evaluation(
            data, table[state], table[np.clip(next_state, 0, 715)], behaviour, gamma=1.0, epsilon=0.0, n_boot=40,
            key=jax.random.key(0), fqe="tabular", n_states=716,
        )  # fmt: skip
        for name in ("wis", "wdr", "fqe"):
            assert scores.estimate[name][k] == pytest.approx(result["estimators"][name]["estimate"], abs=2e-5), name
        names = ("wis", "wdr", "fqe") if has_interval[k] else ("wis", "wdr")
        for name in names:  # same resamples, same estimator: the same interval
            # (select's WDR interval holds FQE's full-data Q fixed: ope's `ci_fixed_model`; ope's reported
            # WDR interval refits FQE on every resample, which select does not do for every candidate)
            est = result["estimators"][name]
            low, high = est["ci_fixed_model"] if name == "wdr" else (est["ci_low"], est["ci_high"])
            assert scores.ci_low[name][k] == pytest.approx(low, abs=2e-5), name
            assert scores.ci_high[name][k] == pytest.approx(high, abs=2e-5), name
        assert scores.ess[k] == pytest.approx(result["weights"]["ess"], rel=1e-4)


# ----------------------------------------------------------------------------------------------
# Selection measures by hand


def make_scores(estimate, low, high, wis=None) -> S.Scores:
    estimate, low, high = (np.asarray(x, np.float64) for x in (estimate, low, high))
    wis = estimate if wis is None else np.asarray(wis, np.float64)
    return S.Scores(
        estimate={"fqe": estimate, "wdr": estimate, "wis": wis},
        ci_low={"fqe": low, "wdr": low, "wis": wis - 0.1},
        ci_high={"fqe": high, "wdr": high, "wis": wis + 0.1},
        ess=np.ones(len(estimate)), max_weight=np.ones(len(estimate)), fqe_kind="test", n_episodes=1,
        n_transitions=1,
    )  # fmt: skip


def test_rules_pick_by_lower_bound_or_estimate():
    # candidate 1 has the highest estimate but a wide interval; candidate 2 the highest lower bound
    scores = make_scores([0.80, 0.83, 0.82, 0.79], [0.78, 0.70, 0.81, 0.785], [0.82, 0.90, 0.83, 0.80])
    assert S.select_index(scores, "fqe", "estimate") == 1
    assert S.select_index(scores, "fqe", "lcb") == 2
    # ties on the bound go to the higher estimate
    tied = make_scores([0.80, 0.81], [0.79, 0.79], [0.81, 0.82])
    assert S.select_index(tied, "fqe", "lcb") == 1
    with pytest.raises(S.SelectionError, match="no finite"):
        S.select_index(make_scores([np.nan], [np.nan], [np.nan]), "fqe", "lcb")


def test_two_stage_only_ranks_the_wis_shortlist_by_fqe():
    # FQE prefers candidate 0, but WIS keeps only candidates 2 and 3 on a shortlist of 2
    scores = make_scores([0.90, 0.80, 0.82, 0.81], [0.85, 0.79, 0.80, 0.805], [0.95, 0.81, 0.84, 0.82],
                         wis=[0.70, 0.71, 0.75, 0.74])  # fmt: skip
    kept = S.add_two_stage(scores, 2)
    assert kept.tolist() == [False, False, True, True]
    assert S.select_index(scores, "two-stage", "estimate") == 2
    assert S.select_index(scores, "two-stage", "lcb") == 3
    # the full ranking: shortlist by FQE, then the rest by WIS (1 before 0)
    order = np.argsort(-scores.estimate["two-stage"])
    assert order.tolist() == [2, 3, 1, 0]


def test_regret_and_spearman_against_hand_computed_values():
    exact = np.array([0.80, 0.82, 0.81, 0.79, 0.815])
    estimates = np.array([0.70, 0.75, 0.76, 0.60, 0.74])
    # ranks: exact [2, 5, 3, 1, 4]; estimates [2, 4, 5, 1, 3]; d = [0, 1, -2, 0, 1]; sum d^2 = 6
    # rho = 1 - 6 * 6 / (5 * 24) = 0.7
    assert S.spearman(estimates, exact) == pytest.approx(0.7)
    assert S.regret(exact, 2) == pytest.approx(0.01)
    assert S.regret(exact, 1) == 0.0
    assert S.top_k_regret(exact, estimates, 1) == pytest.approx(0.01)  # top-1 by estimate is candidate 2
    assert S.top_k_regret(exact, estimates, 2) == pytest.approx(0.0)  # candidates 2 and 1
    # ties take the average rank: [1, 2.5, 2.5, 4]
    assert S.rankdata(np.array([0.1, 0.3, 0.3, 0.9])).tolist() == [1.0, 2.5, 2.5, 4.0]
    # with ties: Pearson of ranks [1, 2.5, 2.5, 4] and [1, 2, 3, 4] = 4.5 / sqrt(4.5 * 5)
    assert S.spearman(np.array([0.1, 0.3, 0.3, 0.9]), np.arange(4.0)) == pytest.approx(4.5 / np.sqrt(22.5))
    # a NaN estimate (every weight zero) ranks lowest
    assert S.spearman(np.array([np.nan, 1.0, 2.0]), np.array([0.0, 1.0, 2.0])) == pytest.approx(1.0)
