"""cleansepsis: offline RL for sepsis treatment. Research use only."""

from typing import Any

__all__ = ["load_policy"]


def __getattr__(name: str) -> Any:
    # lazy, so `import cleansepsis` does not import jax
    if name == "load_policy":
        from cleansepsis.policy import load_policy

        return load_policy
    raise AttributeError(f"module 'cleansepsis' has no attribute {name!r}")
