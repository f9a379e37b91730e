"""An MDP built from a cohort replay: the recipe on hand-made counts, k-means, and the rebuild of ICU-Sepsis."""

import numpy as np
import pytest

from cleansepsis import cohort_mdp as C
from cleansepsis import env as E
from cleansepsis import mdp


@pytest.fixture(scope="module")
def cohort_icu_replay(tmp_path_factory):
    """3,000 clinician episodes of ICU-Sepsis, written as a replay."""
    from cleansepsis.icu_replay import make_clinician_replay
    from cleansepsis.replay import write_replay

    path = tmp_path_factory.mktemp("cohort") / "icu.parquet"
    write_replay(path, *make_clinician_replay(3000, seed=5))
    return path


@pytest.fixture(scope="module")
def cohort_icu_dir(cohort_icu_replay):
    out = cohort_icu_replay.parent / "mdp"
    C.build_cohort_mdp(C.CohortMdpArgs(replay=cohort_icu_replay, out=out, cluster="state-index", threshold=0))
    return out


def test_threshold_pruning_and_inadmissible_rows_on_hand_made_counts():
    """4 clusters, 2 actions. Cluster 3 has no pair above the threshold (dead); cluster 2's only admissible
    action leads only into 3, so it dies in the second round; 0 and 1 stay."""
    k, n_actions = 4, 2
    counts = np.zeros((k, n_actions, k + 2))
    counts[0, 0, [1, 4]] = [30, 10]  # 0 -a0-> 1 or death
    counts[0, 1, [2, 5]] = [5, 25]  # 0 -a1-> 2 or survival (loses its mass into 2 after pruning)
    counts[1, 0, [5]] = [40]
    counts[1, 1, [4]] = [3]  # below the threshold: inadmissible
    counts[2, 0, [3]] = [50]
    counts[3, 0, [4]] = [2]
    visits = counts.sum(-1)
    starts = np.array([3.0, 1.0, 4.0, 0.0])
    built = C.build_arrays(counts, visits, starts, threshold=20, inadmissible="mean")
    assert built["kept_clusters"].tolist() == [0, 1] and built["pruned"] == 2 and built["pruning_rounds"] == 2
    tx, mask = built["tx"], built["admissible_mask"]
    death, survival = 2, 3
    np.testing.assert_allclose(tx[0, 0], [0, 0.75, 0.25, 0])
    np.testing.assert_allclose(tx[0, 1], [0, 0, 0, 1.0])  # the 5 counts into pruned cluster 2 removed
    np.testing.assert_allclose(tx[1, 0], [0, 0, 0, 1.0])
    assert mask[:2].tolist() == [[True, True], [True, False]]
    np.testing.assert_allclose(tx[1, 1], tx[1, 0])  # inadmissible = mean of the admissible rows
    np.testing.assert_allclose(tx[death, :, death], 1.0)
    np.testing.assert_allclose(tx[survival, :, survival], 1.0)
    np.testing.assert_allclose(built["start_dist"], [0.75, 0.25, 0, 0])  # starts in pruned 2 dropped
    np.testing.assert_allclose(built["clinician_probs"][1], [40 / 43, 3 / 43])  # not thresholded
    single = C.build_arrays(counts, visits, starts, threshold=20, inadmissible="single")
    np.testing.assert_allclose(single["tx"][1, 1], single["tx"][1, 0])
    with pytest.raises(C.CohortMDPError, match="threshold"):
        C.build_arrays(counts, visits, starts, threshold=100, inadmissible="mean")


def test_counting_uses_the_next_row_and_the_outcome():
    # episode 7: clusters 0 -> 1 -> (terminated, reward 1: survival); episode 9: 1 -> truncated into next_obs 0
    cluster = np.array([0, 1, 1])
    next_cluster = np.array([1, 0, 0])
    counted = C.count_transitions(
        cluster,
        next_cluster,
        np.array([0, 1, 0]),
        np.array([7, 7, 9]),
        np.array([0, 1, 0]),
        np.array([0.0, 1.0, 0.0]),
        np.array([False, True, False]),
        k=2,
        n_actions=2,
    )
    tx = counted["counts"]
    assert tx[0, 0, 1] == 1 and tx[1, 1, 3] == 1 and tx[1, 0, 0] == 1 and tx.sum() == 3
    assert counted["starts"].tolist() == [1.0, 1.0]


def test_cycles_without_exit_are_found():
    tx = np.zeros((3, 1, 3))
    tx[0, 0, 0] = 1.0  # a state that can stay forever
    tx[1:, 0, 1:] = np.eye(2)
    assert C.improper_states(tx, np.ones((3, 1), bool), 1).tolist() == [0]
    tx[0, 0] = [0.5, 0.5, 0]
    assert C.improper_states(tx, np.ones((3, 1), bool), 1).size == 0


def test_kmeans_is_seeded_and_finds_separated_clusters():
    rng = np.random.default_rng(0)
    means = np.array([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = np.concatenate([m + rng.normal(size=(200, 2)) for m in means]).astype(np.float32)
    centres = C.kmeans(x, 3, seed=1, n_init=2)
    np.testing.assert_array_equal(centres, C.kmeans(x, 3, seed=1, n_init=2))
    found = centres[np.argsort(centres[:, 0] * 100 + centres[:, 1])]
    np.testing.assert_allclose(found, means[np.argsort(means[:, 0] * 100 + means[:, 1])], atol=0.3)
    labels = C.nearest(x, centres)
    assert len(set(labels[:200])) == len(set(labels[200:400])) == 1


def test_rebuilding_icu_sepsis_from_its_clinician_replay(tmp_path, cohort_icu_dir):
    """state_index as the cluster: the admissible pairs are the original's; the rebuilt clinician and random
    values are close to the original's (3,000 episodes); the mapped replay names its MDP."""
    from cleansepsis.replay import load_replay

    params = C.load_params(cohort_icu_dir)
    arrays, meta = C.read_mdp(cohort_icu_dir.resolve())
    ids = np.array(meta["kept_cluster_ids"])
    assert not (arrays["admissible_mask"][: len(ids)] & ~E.shipped_arrays()["admissible_mask"][ids]).any()
    rebuilt = mdp.reference_values(params)
    original = E.reference_values(E.load_params())
    assert (
        abs(rebuilt["clinician"]["expected_return"] - original["clinician_renormalised"]["expected_return"])
        < 0.03
    )
    replay = load_replay(cohort_icu_dir / C.REPLAY_FILE)
    assert replay.meta["env_id"] == C.ENV_ID
    loaded = mdp.params_for_replay(replay.meta)
    assert loaded is params
    # 3,000 episodes leave actions seen once whose one transition is a self-loop: evaluated over 200 steps
    assert meta["improper_states"] > 0 and params.finite_horizon
    data = replay.split("train")
    state = np.asarray(data.state_index)
    np.testing.assert_array_equal(np.asarray(data.obs), np.asarray(params.state_vectors)[state])


def test_cli_errors_are_one_line(tmp_path, cohort_icu_replay, capsys):
    import data_prep

    assert (
        data_prep.main(
            [
                "mdp",
                "--replay",
                str(cohort_icu_replay),
                "--out",
                str(tmp_path / "m"),
                "--cluster",
                "state-index",
                "--threshold",
                "100000",
            ]
        )
        == 1
    )
    assert "error:" in capsys.readouterr().err and not (tmp_path / "m").exists()
