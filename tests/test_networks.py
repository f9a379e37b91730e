"""cleansepsis.networks.structure: the abstract structure equals the eager one, for every learner's network."""

import equinox as eqx
import jax
import numpy as np

import dqn
from cleansepsis.networks import MLP, structure


def eager_structure(model):
    return eqx.partition(model, eqx.is_array)[1]


def test_structure_matches_the_built_model_and_combines_with_its_arrays():
    key = jax.random.key(3)
    builders = {
        "mlp": lambda: MLP(7, 5, (8, 8), key),
        "scalar head": lambda: MLP(7, "scalar", (8,), key),
        "twin (vmapped)": lambda: eqx.filter_vmap(lambda k: MLP(7, 5, (8,), k))(jax.random.split(key, 2)),
        "dueling": lambda: dqn.QNetwork(7, 5, (8, 8), True, key),
    }
    x = np.linspace(-1, 1, 7, dtype=np.float32)
    for name, make in builders.items():
        model = make()
        abstract = structure(make)
        assert eqx.tree_equal(abstract, eager_structure(model)), name
        rebuilt = eqx.combine(eqx.filter(model, eqx.is_array), abstract)
        if name != "twin (vmapped)":
            np.testing.assert_array_equal(np.asarray(rebuilt(x)), np.asarray(model(x)))
    # a different width is a different structure
    assert not eqx.tree_equal(structure(lambda: MLP(7, 5, (8, 8), key)), structure(lambda: MLP(7, 5, (8,), key)))
