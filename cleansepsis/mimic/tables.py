"""Finding and scanning MIMIC-IV tables (v2.2 and v3.x layouts) as lazy polars frames, with schema checks.

A table is `<mimic-dir>/<module>/<name>` with the suffix `.csv.gz`, `.csv` or `.parquet` (the first found,
in that order of preference: parquet, csv, csv.gz). Only the columns the pipeline needs are read, with fixed
types, so a wrong column or dtype fails with a message naming the file and the column.
"""

from __future__ import annotations

import gzip
import zlib
from dataclasses import dataclass
from pathlib import Path

import polars as pl


class MimicInputError(ValueError):
    """An input that cannot be used; the message names the file, column or value and what was expected."""


INT, FLOAT, STR, TIME, DATE = pl.Int64, pl.Float64, pl.String, pl.Datetime("us"), pl.Date

# Columns the pipeline reads from each table, with their types. Other columns are ignored (and may be
# blank, like chartevents' storetime/caregiver_id in the demo).
SCHEMAS: dict[str, dict[str, pl.DataType]] = {
    "icu/icustays": {"subject_id": INT, "hadm_id": INT, "stay_id": INT, "intime": TIME, "outtime": TIME},
    "hosp/patients": {"subject_id": INT, "gender": STR, "anchor_age": INT, "anchor_year": INT, "dod": DATE},
    "hosp/admissions": {
        "subject_id": INT,
        "hadm_id": INT,
        "admittime": TIME,
        "dischtime": TIME,
        "deathtime": TIME,
    },
    "icu/chartevents": {"stay_id": INT, "charttime": TIME, "itemid": INT, "value": STR, "valuenum": FLOAT},
    # hadm_id (null for outpatient labs): labs attach to the admission, as mimic-code; storetime: when the
    # result became available (the state sees a lab only from then); specimen_id + value: blood gas specimen type
    "hosp/labevents": {
        "subject_id": INT,
        "hadm_id": INT,
        "specimen_id": INT,
        "itemid": INT,
        "charttime": TIME,
        "storetime": TIME,
        "value": STR,
        "valuenum": FLOAT,
    },
    "icu/inputevents": {
        "stay_id": INT,
        "starttime": TIME,
        "endtime": TIME,
        "itemid": INT,
        "amount": FLOAT,
        "amountuom": STR,
        "rate": FLOAT,
        "rateuom": STR,
        "patientweight": FLOAT,
        "statusdescription": STR,
    },
    "icu/outputevents": {"stay_id": INT, "charttime": TIME, "itemid": INT, "value": FLOAT},
    "icu/procedureevents": {"stay_id": INT, "starttime": TIME, "endtime": TIME, "itemid": INT},
    "hosp/prescriptions": {
        "subject_id": INT,
        "hadm_id": INT,
        "starttime": TIME,
        "drug_type": STR,
        "drug": STR,
        "route": STR,
    },
    "hosp/microbiologyevents": {
        "subject_id": INT,
        "hadm_id": INT,
        "micro_specimen_id": INT,
        "chartdate": TIME,
        "charttime": TIME,
    },
    "hosp/diagnoses_icd": {"subject_id": INT, "hadm_id": INT, "icd_code": STR, "icd_version": INT},
}
SUFFIXES = (".parquet", ".csv", ".csv.gz")


@dataclass(frozen=True)
class Table:
    """One located input table."""

    key: str  # "icu/chartevents"
    path: Path

    @property
    def columns(self) -> dict[str, pl.DataType]:
        return SCHEMAS[self.key]

    def scan(self) -> pl.LazyFrame:
        """Lazy frame of the needed columns with their fixed types (nothing is read yet)."""
        wanted = self.columns
        if self.path.suffix == ".parquet":
            lf = pl.scan_parquet(self.path)
            have = lf.collect_schema()
            exprs = []
            for name, dtype in wanted.items():
                if dtype in (TIME, DATE) and have[name] == pl.String:
                    exprs.append(_parse_time(name, dtype))
                else:
                    exprs.append(pl.col(name).cast(dtype, strict=True))
            return lf.select(exprs)
        overrides = {name: (STR if dtype in (TIME, DATE) else dtype) for name, dtype in wanted.items()}
        lf = pl.scan_csv(self.path, schema_overrides=overrides, infer_schema_length=0)
        return lf.select([_parse_time(n, d) if d in (TIME, DATE) else pl.col(n) for n, d in wanted.items()])


def _parse_time(name: str, dtype: pl.DataType) -> pl.Expr:
    """Parse MIMIC timestamps ("2180-07-23 12:36:00") or dates strictly: a bad value stops the run."""
    if dtype == DATE:
        return pl.col(name).str.slice(0, 10).str.to_date("%Y-%m-%d", strict=True)
    # ISO "T" separators (as some exports write) are read like MIMIC's space
    text = pl.col(name).str.replace("T", " ", literal=True)
    return text.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", time_unit="us", strict=True).alias(name)


def find_table(mimic_dir: Path, key: str) -> Table:
    module, name = key.split("/")
    folder = mimic_dir / module
    if not folder.is_dir():
        raise MimicInputError(
            f"{folder}: folder not found; --mimic-dir must hold MIMIC-IV's hosp/ and icu/ folders"
        )
    for suffix in SUFFIXES:
        path = folder / f"{name}{suffix}"
        if path.is_file():
            return Table(key, path)
    raise MimicInputError(
        f"{folder}: table {name!r} not found (looked for {', '.join(name + s for s in SUFFIXES)})"
    )


def header_columns(table: Table) -> list[str]:
    """Column names from the file header, reading only its first bytes."""
    path = table.path
    if path.suffix == ".parquet":
        try:
            columns = list(pl.read_parquet_schema(path).keys())
            rows = pl.scan_parquet(path).select(pl.len()).collect().item()
        except Exception as err:
            raise MimicInputError(f"{path}: not a readable parquet file ({err})") from None
        if rows == 0:
            raise MimicInputError(f"{path}: has no rows; expected a non-empty MIMIC-IV table")
        return columns
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rt", encoding="utf-8", newline="") as handle:
                line, second = handle.readline(), handle.readline()
        else:
            with open(path, encoding="utf-8", newline="") as handle:
                line, second = handle.readline(), handle.readline()
    except (OSError, EOFError, zlib.error, UnicodeDecodeError) as err:
        raise MimicInputError(
            f"{path}: cannot be read as {'gzip ' if path.name.endswith('.gz') else ''}CSV ({err})"
        ) from None
    if not line.strip():
        raise MimicInputError(f"{path}: is empty; expected a CSV header with columns {list(table.columns)}")
    if not second.strip():
        raise MimicInputError(f"{path}: has a header but no rows; expected a non-empty MIMIC-IV table")
    return [c.strip().strip('"') for c in line.rstrip("\r\n").split(",")]


def check_gzip_complete(path: Path) -> None:
    """A truncated gzip is found by reading its trailer: cheap, and done before any output is written."""
    if not path.name.endswith(".gz"):
        return
    size = path.stat().st_size
    if size < 18:
        raise MimicInputError(f"{path}: truncated gzip file ({size} bytes)")
    with open(path, "rb") as handle:
        magic = handle.read(2)
    if magic != b"\x1f\x8b":
        raise MimicInputError(f"{path}: not a gzip file (bad magic bytes); expected a .csv.gz from PhysioNet")


def open_tables(mimic_dir: Path) -> dict[str, Table]:
    """Locate every table the pipeline needs and check each header has the needed columns."""
    mimic_dir = Path(mimic_dir)
    if not mimic_dir.is_dir():
        raise MimicInputError(f"{mimic_dir}: --mimic-dir not found or not a folder")
    tables = {}
    for key in SCHEMAS:
        table = find_table(mimic_dir, key)
        check_gzip_complete(table.path)
        present = set(header_columns(table))
        missing = [c for c in table.columns if c not in present]
        if missing:
            raise MimicInputError(
                f"{table.path}: missing column(s) {missing}; expected at least {list(table.columns)}"
            )
        tables[key] = table
    return tables


def _type_name(dtype: pl.DataType) -> str:
    return {INT: "integer", FLOAT: "number", STR: "text", TIME: "timestamp", DATE: "date"}.get(
        dtype, str(dtype)
    )


def explain_polars_error(table: Table, err: Exception) -> MimicInputError:
    """Turn a polars read/parse error into one line naming the file (polars names the column and value)."""
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    first = lines[0] if lines else type(err).__name__
    lowered = str(err).lower()
    if any(word in lowered for word in ("gzip", "deflate", "decompress", "end of file", "eof")):
        return MimicInputError(f"{table.path}: corrupt or truncated compressed file ({first})")
    expected = ", ".join(f"{name}: {_type_name(dtype)}" for name, dtype in table.columns.items())
    return MimicInputError(f"{table.path}: {first}; expected columns {expected}")


def collect(table: Table, lf: pl.LazyFrame, streaming: bool = True) -> pl.DataFrame:
    """Collect a query over one table; any read or parse failure becomes a MimicInputError naming it."""
    try:
        return lf.collect(engine="streaming" if streaming else "auto")
    except MimicInputError:
        raise
    except Exception as err:  # polars raises ComputeError, InvalidOperationError, OSError, ... for bad files
        raise explain_polars_error(table, err) from None


def collect_many(table: Table, frames: list[pl.LazyFrame]) -> list[pl.DataFrame]:
    """Collect several queries over one table together (polars shares the common scan)."""
    try:
        return pl.collect_all(frames, engine="streaming")
    except MimicInputError:
        raise
    except Exception as err:
        raise explain_polars_error(table, err) from None
