"""Build cleansepsis replays (parquet, see cleansepsis/replay.py) from a data source.

    python data_prep.py icu-sepsis --episodes 10000 --seed 0 --out data/icu_sepsis.parquet
    python data_prep.py sepsis-sim --episodes 10000 --seed 0 --out data/sepsis_sim.parquet
    python data_prep.py vancomycin-sim --episodes 10000 --seed 0 --out data/vanco_sim.parquet
    python data_prep.py vancomycin --mimic-dir ../shared/data/mimic-iv-demo-2.2 --out data/vancomycin_mimic
    python data_prep.py vancomycin-synth --stays 200 --out data/vancomycin_tables
    python data_prep.py mdp --replay data/mimic/replay.parquet --states 100 --threshold 5 --out data/mdp
    python data_prep.py export-minari data/icu_sepsis.parquet --out data/minari

Each subcommand is an Args dataclass (its fields become the flags) and a function that builds and writes
the replay; adding a source is one entry in SUBCOMMANDS.
"""

from __future__ import annotations

import sys

from cleansepsis import interrupts

if __name__ == "__main__":  # first, so that Ctrl-C while jax and polars load also ends in one line, status 130
    interrupts.install()

from collections.abc import Callable, Sequence
from typing import Any

import tyro

from cleansepsis.cohort_mdp import CohortMdpArgs, build_cohort_mdp
from cleansepsis.icu_replay import IcuSepsisArgs, build_icu_sepsis
from cleansepsis.io import OutputExistsError, check_output
from cleansepsis.mdp_replay import SepsisSimArgs, build_sepsis_sim
from cleansepsis.mimic.pipeline import MimicArgs
from cleansepsis.mimic.pipeline import run as build_mimic
from cleansepsis.mimic.synth import SynthArgs
from cleansepsis.mimic.synth import generate as build_synth
from cleansepsis.mimic.vancomycin import VancomycinArgs
from cleansepsis.mimic.vancomycin import run as build_vancomycin_mimic
from cleansepsis.mimic.vancomycin_synth import VancomycinSynthArgs
from cleansepsis.mimic.vancomycin_synth import generate as build_vancomycin_synth
from cleansepsis.minari_export import ExportMinariArgs, export_minari
from cleansepsis.replay import ReplayError
from cleansepsis.vancomycin_replay import VancomycinSimArgs, build_vancomycin_sim

# name -> (Args dataclass, builder taking an Args instance)
SUBCOMMANDS: dict[str, tuple[type, Callable[[Any], Any]]] = {
    "icu-sepsis": (IcuSepsisArgs, build_icu_sepsis),
    "mimic": (MimicArgs, build_mimic),
    "synth": (SynthArgs, build_synth),
    "sepsis-sim": (SepsisSimArgs, build_sepsis_sim),
    "vancomycin-sim": (VancomycinSimArgs, build_vancomycin_sim),
    "mdp": (CohortMdpArgs, build_cohort_mdp),
    "vancomycin": (VancomycinArgs, build_vancomycin_mimic),
    "vancomycin-synth": (VancomycinSynthArgs, build_vancomycin_synth),
    "export-minari": (ExportMinariArgs, export_minari),
}

# what each subcommand's --out names; a subcommand missing here gets the checks that hold for both
OUTPUT_KINDS = {"icu-sepsis": "file", "mimic": "dir", "synth": "dir", "sepsis-sim": "file", "mdp": "dir",
                "vancomycin-sim": "file", "vancomycin": "dir",
                "vancomycin-synth": "dir"}
# --out names a folder of several outputs; the builder checks its own target in it before the work
OUTPUT_ROOTS = {"export-minari"}


def main(argv: Sequence[str] | None = None) -> int:
    args = tyro.extras.subcommand_cli_from_dict(
        {name: args_type for name, (args_type, _) in SUBCOMMANDS.items()},
        args=argv,
        description=__doc__.splitlines()[0],
    )
    name, build = next(
        (n, builder) for n, (args_type, builder) in SUBCOMMANDS.items() if isinstance(args, args_type)
    )

    def work() -> None:
        if getattr(args, "out", None) is not None and name not in OUTPUT_ROOTS:  # before the work: an unusable --out fails in a second
            check_output(args.out, OUTPUT_KINDS.get(name), overwrite=bool(getattr(args, "overwrite", False)))
        build(args)

    return interrupts.run_cli(work, (OutputExistsError, ReplayError, ValueError, FileNotFoundError))


if __name__ == "__main__":
    sys.exit(main())
