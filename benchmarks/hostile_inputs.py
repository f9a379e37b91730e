"""Hostile inputs: corrupted replays, tampered checkpoints and bad command lines, each run against a checkout
of cleansepsis, with one table row per case.

A case passes when it ends in the correct result (a valid input accepted) or in the project's error (a
replay, checkpoint or output error: one `error:` line in a CLI), with no traceback, nothing half-written
and its inputs unchanged.

- replay and checkpoint cases run in one worker process inside the checkout (its own code and venv): each
  builds its input from a valid one with one thing broken, calls `load_replay` / `load_policy` as every CLI
  does before compiling anything, and records what came back. A project error there is what the CLIs print
  as one `error:` line with a non-zero status (runs.cli_main, evaluate.main).
- command-line cases run the checkout's scripts in subprocesses (data_prep.py, a learner, evaluate), and
  check the exit status, the `error:` lines, tracebacks, and leftovers in the output folder.

    uv run python benchmarks/hostile_inputs.py                 # this checkout
    uv run python benchmarks/hostile_inputs.py --repo /work/main --python /work/main/.venv/bin/python
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# replay cases the command-line cases train on, copied to these names
CLI_INPUTS = {"every row terminated": "cli_all_terminated.parquet",
              "mask excludes logged action": "cli_mask_excludes.parquet"}
PROJECT_ERRORS = ("ReplayError", "CheckpointError", "PolicyError", "OutputExistsError", "OutputPathError")


# --------------------------------------------------------------------------------------------------
# Worker: runs inside the checkout under test


def _worker(repo: Path, workdir: Path) -> list[dict]:
    sys.path.insert(0, str(repo))
    import numpy as np
    import polars as pl

    from cleansepsis import replay as R
    from cleansepsis.checkpoint import save_checkpoint
    from cleansepsis.icu_replay import make_clinician_replay
    from cleansepsis.policy import load_policy

    frame, meta = make_clinician_replay(150, seed=0, val_frac=0.2, test_frac=0.2)
    rows_out: list[dict] = []

    def digest(path: Path) -> str:
        if path.is_dir():
            return hashlib.sha256(b"".join(digest(p).encode() for p in sorted(path.rglob("*")))).hexdigest()
        return hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "-"

    def run_case(group: str, name: str, expect: str, path: Path, load) -> None:
        before, listing = digest(path), sorted(p.name for p in path.parent.iterdir())
        row = {"group": group, "case": name, "expect": expect}
        try:
            load(path)
            row["outcome"], row["error"] = "accepted", ""
        except Exception as err:  # the point is to see what comes back
            kind = type(err).__name__
            row["outcome"] = "error" if kind in PROJECT_ERRORS else f"traceback {kind}"
            row["error"] = str(err).replace(str(workdir), "").splitlines()[0][:160] if str(err) else kind
        row["unchanged"] = digest(path) == before
        row["half_written"] = sorted(p.name for p in path.parent.iterdir()) != listing
        rows_out.append(row)

    # ---- replays ------------------------------------------------------------------------------------
    full_meta = {"schema_version": R.SCHEMA_VERSION, "action_encoding": R.ACTION_ENCODING, **meta}

    def raw(f: pl.DataFrame, m: dict | None, rehash: bool = True) -> Path:
        path = workdir / f"replay_{len(rows_out)}.parquet"
        if m is None:
            f.write_parquet(path)
            return path
        m = dict(m)
        if rehash:
            try:
                m["content_hash"] = R.content_hash(f)
            except Exception:  # the new code refuses unhashable columns
                m["content_hash"] = "0" * 64
        f.write_parquet(path, metadata={R.METADATA_KEY: json.dumps(m)})
        return path

    def col(f: pl.DataFrame, name: str) -> np.ndarray:
        return f.get_column(name).to_numpy().copy()

    def put(f: pl.DataFrame, name: str, values) -> pl.DataFrame:
        return f.with_columns(pl.Series(name, values, f.schema[name]))

    def edit(name: str, row: int, value) -> pl.DataFrame:
        values = col(frame, name)
        values[row] = value
        return put(frame, name, values)

    episode, t = col(frame, "episode_id"), col(frame, "t")
    long_ep = next(e for e in np.unique(episode) if (episode == e).sum() >= 4)
    ep_rows = np.flatnonzero(episode == long_ep)
    r0, r1 = int(ep_rows[0]), int(ep_rows[1])
    mask = col(frame, "action_mask")
    action = col(frame, "action")
    roomy = int(np.flatnonzero((mask.sum(1) >= 2) & (t >= 1))[0])

    def load(path: Path):
        R.load_replay(path)

    replay_cases = {
        # format, handled before this work
        "missing column reward": ("refuse", lambda: raw(frame.drop("reward"), full_meta)),
        "action stored as Int64": ("refuse", lambda: raw(frame.with_columns(pl.col("action").cast(pl.Int64)),
                                                         full_meta)),
        "obs of width 46": ("refuse", lambda: raw(frame.with_columns(
            pl.Series("obs", col(frame, "obs")[:, :46], pl.Array(pl.Float32, 46))), full_meta)),
        "action 25": ("refuse", lambda: raw(edit("action", 3, 25), full_meta)),
        "action -1": ("refuse", lambda: raw(edit("action", 3, -1), full_meta)),
        "NaN reward": ("refuse", lambda: raw(edit("reward", 3, np.nan), full_meta)),
        "inf in obs": ("refuse", lambda: raw(put(frame, "obs", np.where(np.arange(len(frame))[:, None] == 2,
                                                                        np.inf, col(frame, "obs"))), full_meta)),
        "null t": ("refuse", lambda: raw(frame.with_columns(pl.when(pl.col("t") == 1).then(None)
                                                            .otherwise(pl.col("t")).alias("t")), full_meta)),
        "behavior_prob 0": ("refuse", lambda: raw(edit("behavior_prob", 3, 0.0), full_meta)),
        "behavior_prob 1.5": ("refuse", lambda: raw(edit("behavior_prob", 3, 1.5), full_meta)),
        "episode in two splits": ("refuse", lambda: raw(edit("split", r0, "test" if col(frame, "split")[r0] != "test"
                                                              else "train"), full_meta)),
        "unknown split 'dev'": ("refuse", lambda: raw(put(frame, "split", np.where(col(frame, "split") == "val",
                                                                                   "dev", col(frame, "split"))),
                                                     full_meta)),
        "schema version 99": ("refuse", lambda: raw(frame, {**full_meta, "schema_version": 99})),
        "metadata without feature_names": ("refuse", lambda: raw(frame, {k: v for k, v in full_meta.items()
                                                                         if k != "feature_names"})),
        "no cleansepsis metadata": ("refuse", lambda: raw(frame, None)),
        "metadata not JSON": ("refuse", lambda: _write_bad_meta(frame, workdir, R.METADATA_KEY)),
        "file cut in half": ("refuse", lambda: _truncate(raw(frame, full_meta))),
        "CSV named .parquet": ("refuse", lambda: _text(workdir / "csv.parquet", "episode_id,t\n0,0\n")),
        "empty file": ("refuse", lambda: _text(workdir / "empty.parquet", "")),
        "zero rows": ("refuse", lambda: raw(frame.head(0), full_meta)),
        "rows edited, hash kept": ("refuse", lambda: raw(edit("reward", 3, 5.0), {**full_meta,
                                                         "content_hash": R.content_hash(frame)}, rehash=False)),
        "47 features named for obs_dim 46": ("refuse", lambda: raw(frame, {**full_meta, "obs_dim": 46})),
        "action encoding 5*vaso+fluid": ("refuse", lambda: raw(frame, {**full_meta, "action_encoding": "5*vaso+fluid"})),
        # structure (issue #15)
        "every row terminated": ("refuse", lambda: raw(frame.with_columns(pl.lit(True).alias("terminated")),
                                                       full_meta)),
        "episode never ends": ("refuse", lambda: raw(edit("terminated", int(ep_rows[-1]), False)
                                                     .pipe(lambda f: put(f, "truncated", col(f, "truncated") & False)),
                                                     full_meta)),
        "rows after the end": ("refuse", lambda: raw(edit("truncated", r1, True), full_meta)),
        "duplicated row": ("refuse", lambda: raw(pl.concat([frame, frame.slice(r1, 1)]), full_meta)),
        "t gap": ("refuse", lambda: raw(edit("t", r1, 7), full_meta)),
        "negative t": ("refuse", lambda: raw(edit("t", r0, -1), full_meta)),
        "t repeated": ("refuse", lambda: raw(edit("t", r1, 0), full_meta)),
        "episode starts at t=1": ("refuse", lambda: raw(frame.filter(
            ~((pl.col("episode_id") == long_ep) & (pl.col("t") == 0))), full_meta)),
        "mask excludes logged action": ("refuse", lambda: raw(put(frame, "action_mask", _unset(mask, roomy,
                                                                  action[roomy])), full_meta)),
        "mask admits nothing": ("refuse", lambda: raw(put(frame, "action_mask", _unset(mask, r0, slice(None))),
                                                      full_meta)),
        "next mask != next row's mask": ("refuse", lambda: raw(put(frame, "next_action_mask", _flip(
            col(frame, "next_action_mask"), r0, (action[r1] + 1) % 25)), full_meta)),
        "next mask empty mid-episode": ("refuse", lambda: raw(put(frame, "next_action_mask", _unset(
            col(frame, "next_action_mask"), r0, slice(None))), full_meta)),
        "state_index 716": ("refuse", lambda: raw(edit("state_index", r0, 716), full_meta)),
        "state_index -1": ("refuse", lambda: raw(edit("state_index", r0, -1), full_meta)),
        "state_index naming two obs": ("refuse", lambda: raw(edit("state_index", r0, int(
            next(s for s in col(frame, "state_index") if s != col(frame, "state_index")[r0]))), full_meta)),
        "next_state_index != next row's": ("refuse", lambda: raw(edit(
            "next_state_index", r0, (col(frame, "next_state_index")[r0] + 1) % 700), full_meta)),
        "next_obs != next row's obs": ("refuse", lambda: raw(put(frame, "next_obs", col(frame, "next_obs")
                                                                  + (np.arange(len(frame)) == r0)[:, None]),
                                                             full_meta)),
        "list extra column": ("refuse at write", lambda: _via_write(R, frame.with_columns(
            pl.Series("doses", [[1.0, 2.0]] * len(frame), pl.List(pl.Float64))), meta, workdir)),
        # valid variants: must load
        "valid replay": ("accept", lambda: raw(frame, full_meta)),
        "rows shuffled": ("accept", lambda: raw(frame.sample(fraction=1.0, shuffle=True, seed=1), full_meta)),
        "episodes truncated mid-way": ("accept", lambda: raw(_truncate_episodes(frame, pl), full_meta)),
        "no optional columns (MIMIC-like)": ("accept", lambda: raw(frame.drop(
            "state_index", "next_state_index", "behavior_prob", "action_mask", "next_action_mask"), full_meta)),
        "numeric and string extras": ("accept", lambda: raw(frame.with_columns(
            pl.Series("map_mmhg", np.full(len(frame), np.nan, np.float32)), pl.lit("mL").alias("unit")),
            full_meta)),
    }
    for name, (expect, build) in replay_cases.items():
        try:
            path = build()
        except Exception as err:  # a write-time refusal is this case's result
            kind = type(err).__name__
            rows_out.append({"group": "replay", "case": name, "expect": expect,
                             "outcome": "error" if kind in PROJECT_ERRORS else f"traceback {kind}",
                             "error": str(err).replace(str(workdir), "")[:160], "unchanged": True,
                             "half_written": False})
            continue
        run_case("replay", name, expect, path, load)
        if expect == "refuse at write":  # written: a file that cannot be loaded back, whatever load says
            rows_out[-1]["outcome"] = f"written; load: {rows_out[-1]['outcome']}"
        if name in CLI_INPUTS:
            shutil.copy(path, workdir / CLI_INPUTS[name])

    # ---- checkpoints --------------------------------------------------------------------------------
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(0)

    def tensors(width: int = 64) -> dict:
        shapes = {"hidden_0": (width, 47), "hidden_1": (width, width), "output": (25, width)}
        out = {}
        for layer, shape in shapes.items():
            out[f"{layer}.weight"] = rng.normal(size=shape).astype(np.float32) * 0.1
            out[f"{layer}.bias"] = rng.normal(size=shape[0]).astype(np.float32) * 0.1
        return out

    config = {"network": {"kind": "mlp", "activation": "relu", "hidden": ["hidden_0", "hidden_1"],
                          "output": "output"},
              "outputs": "q_values", "obs_dim": 47, "n_actions": 25, "feature_names": meta["feature_names"],
              "normalisation": meta["normalisation"], "algo": "iql", "seed": 0}

    counter = [0]

    def ckpt(width: int = 64) -> Path:
        counter[0] += 1
        return save_checkpoint(workdir / f"ckpt_{counter[0]}", tensors(width), config)

    def rewrite(path: Path, new: dict, rehash: bool = True) -> Path:
        save_file(new, str(path / "model.safetensors"))
        cfg = json.loads((path / "config.json").read_text())
        if rehash and "weights_sha256" in cfg:  # a forger who also recomputes the recorded hash
            cfg["weights_sha256"] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
            cfg["tensors"] = {k: list(v.shape) for k, v in new.items()}
            (path / "config.json").write_text(json.dumps(cfg))
        return path

    def reconfig(path: Path, change) -> Path:
        cfg = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(change(cfg)))
        return path

    def weights(path: Path) -> dict:
        return dict(load_file(str(path / "model.safetensors")))

    def with_weight(change, rehash: bool = True):
        def build():
            path = ckpt()
            w = weights(path)
            change(w)
            return rewrite(path, w, rehash)
        return build

    def swap_from_wider():
        path, wide = ckpt(), ckpt(128)
        (path / "model.safetensors").write_bytes((wide / "model.safetensors").read_bytes())
        return path

    def net(**kw):
        return lambda: reconfig(ckpt(), lambda c: {**c, "network": {**c["network"], **kw}})

    def set_nan(w):
        w["output.bias"][0] = np.nan

    def set_inf(w):
        w["hidden_0.weight"][0, 0] = np.inf

    def as_type(dtype):
        def change(w):
            for k in w:
                w[k] = w[k].astype(dtype)
        return change

    def transpose_square(w):
        w["hidden_1.weight"] = np.ascontiguousarray(w["hidden_1.weight"].T)

    def transpose_output(w):
        w["output.weight"] = np.ascontiguousarray(w["output.weight"].T)

    def extra_tensor(w):
        w["spare.weight"] = np.ones((2, 2), np.float32)

    def drop_tensor(w):
        del w["output.bias"]

    def act(path: Path):
        policy = load_policy(path)
        policy.select_action(np.zeros((3, 47), np.float32))

    ckpt_cases = {
        "valid checkpoint": ("accept", ckpt),
        "weights of a 128-wide checkpoint": ("refuse", swap_from_wider),
        "transposed square layer": ("refuse", with_weight(transpose_square, rehash=False)),
        "NaN weight (hash recomputed)": ("refuse", with_weight(set_nan)),
        "inf weight (hash recomputed)": ("refuse", with_weight(set_inf)),
        "float16 weights (hash recomputed)": ("refuse", with_weight(as_type(np.float16))),
        "int64 weights (hash recomputed)": ("refuse", with_weight(as_type(np.int64))),
        "float64 weights (hash recomputed)": ("refuse", with_weight(as_type(np.float64))),
        "transposed output layer": ("refuse", with_weight(transpose_output)),
        "extra tensor (hash recomputed)": ("refuse", with_weight(extra_tensor)),
        "missing tensor (hash recomputed)": ("refuse", with_weight(drop_tensor)),
        "unknown outputs 'probabilities'": ("refuse", lambda: reconfig(ckpt(), lambda c: {**c, "outputs": "probabilities"})),
        "unknown network kind": ("refuse", net(kind="resnet")),
        "unknown activation": ("refuse", net(activation="swish2")),
        "unknown network key": ("refuse", net(dropout=0.5)),
        "network is a list": ("refuse", lambda: reconfig(ckpt(), lambda c: {**c, "network": ["hidden_0"]})),
        "hidden is a string": ("refuse", net(hidden="hidden_0")),
        "obs_dim is a string": ("refuse", lambda: reconfig(ckpt(), lambda c: {**c, "obs_dim": "47"})),
        "n_actions is 0": ("refuse", lambda: reconfig(ckpt(), lambda c: {**c, "n_actions": 0})),
        "config is a JSON list": ("refuse", lambda: reconfig(ckpt(), lambda c: [c])),
        "config not JSON": ("refuse", lambda: _text_in(ckpt(), "config.json", "{not json")),
        "config missing": ("refuse", lambda: _remove(ckpt(), "config.json")),
        "weights missing": ("refuse", lambda: _remove(ckpt(), "model.safetensors")),
        "weights garbage": ("refuse", lambda: _text_in(ckpt(), "model.safetensors", "\x00" * 10)),
        "format version 99": ("refuse", lambda: reconfig(ckpt(), lambda c: {**c, "format_version": 99})),
        "action_bins is a list": ("refuse", lambda: reconfig(ckpt(), lambda c: {**c, "action_bins": [1, 2]})),
        "feature_names of length 3": ("refuse", lambda: reconfig(ckpt(), lambda c: {**c, "feature_names": ["a", "b", "c"]})),
    }
    for name, (expect, build) in ckpt_cases.items():
        run_case("checkpoint", name, expect, build(), act)
    return rows_out


def _unset(mask, row, column):
    mask = mask.copy()
    mask[row, column] = False
    return mask


def _flip(mask, row, column):
    mask = mask.copy()
    mask[row, column] = ~mask[row, column]
    return mask


def _truncate_episodes(frame, pl):
    """Cut every episode after its second step and mark that row truncated: time-limit cuts stay valid."""
    cut = frame.filter(pl.col("t") <= 1)
    last = cut.group_by("episode_id").agg(pl.col("t").max().alias("last"))
    cut = cut.join(last, on="episode_id").with_columns(
        (pl.col("truncated") | ((pl.col("t") == pl.col("last")) & ~pl.col("terminated"))).alias("truncated")
    )
    return cut.drop("last")


def _write_bad_meta(frame, workdir: Path, key: str) -> Path:
    path = workdir / "badmeta.parquet"
    frame.write_parquet(path, metadata={key: "{not json"})
    return path


def _truncate(path: Path) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _text_in(folder: Path, name: str, text: str) -> Path:
    (folder / name).write_text(text)
    return folder


def _remove(folder: Path, name: str) -> Path:
    (folder / name).unlink()
    return folder


def _via_write(R, frame, meta, workdir: Path) -> Path:
    """Written by the project's own write_replay: the case is whether it can be loaded again."""
    path = workdir / "via_write.parquet"
    R.write_replay(path, frame, meta)
    return path


# --------------------------------------------------------------------------------------------------
# Command lines, run in subprocesses


def _cli_cases(repo: Path, python: str, workdir: Path) -> list[dict]:
    out_dir = workdir / "cli"
    out_dir.mkdir()
    (out_dir / "a_folder").mkdir()
    (out_dir / "a_file.txt").write_text("x")
    existing = out_dir / "existing.parquet"
    existing.write_text("keep me")
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "CLEANSEPSIS_HOST_DEVICES": "1"}
    prep = [python, str(repo / "data_prep.py"), "icu-sepsis"]
    broken, masks = (workdir / name for name in CLI_INPUTS.values())
    cases = [
        ("data_prep --out onto a folder", "refuse", [*prep, "--episodes", "3000", "--out", f"{out_dir}/a_folder"], None),
        ("data_prep --out onto a folder --overwrite", "refuse",
         [*prep, "--episodes", "3000", "--out", f"{out_dir}/a_folder", "--overwrite"], None),
        ("data_prep --out unwritable (/proc)", "refuse", [*prep, "--episodes", "3000", "--out", "/proc/x.parquet"], None),
        ("data_prep --out under a file", "refuse",
         [*prep, "--episodes", "3000", "--out", f"{out_dir}/a_file.txt/x.parquet"], None),
        ("data_prep --out existing file", "refuse", [*prep, "--episodes", "20", "--out", str(existing)], None),
        ("data_prep --val-frac 2", "refuse", [*prep, "--episodes", "20", "--val-frac", "2", "--out",
                                               f"{out_dir}/v.parquet"], None),
        ("data_prep unknown flag", "refuse", [*prep, "--episodez", "20", "--out", f"{out_dir}/u.parquet"], None),
        ("data_prep valid (20 episodes)", "accept", [*prep, "--episodes", "20", "--out", f"{out_dir}/ok.parquet"], None),
        ("data_prep Ctrl-C after 1.5 s", "interrupt", [*prep, "--episodes", "200000", "--out",
                                                        f"{out_dir}/int1.parquet"], 1.5),
        ("data_prep Ctrl-C after 6 s", "interrupt", [*prep, "--episodes", "200000", "--out",
                                                      f"{out_dir}/int2.parquet"], 6.0),
        ("cql.py on an all-terminated replay", "refuse",
         [python, str(repo / "cql.py"), "--replay", str(broken), "--num-updates", "20", "--eval-every", "10",
          "--num-seeds", "1"], None),
        ("iql.py on a replay whose mask excludes the action", "refuse",
         [python, str(repo / "iql.py"), "--replay", str(masks), "--num-updates", "20", "--eval-every", "10",
          "--num-seeds", "1"], None),
        ("evaluate on a missing run folder", "refuse",
         [python, "-m", "cleansepsis.evaluate", f"{out_dir}/no_such_run"], None),
    ]
    rows = []
    for name, expect, argv, interrupt_after in cases:
        cwd = workdir / f"cwd_{len(rows)}"
        cwd.mkdir()
        before = sorted(p.name for p in out_dir.iterdir())
        inputs_before = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (existing, broken, masks)
                         if p.exists()}
        proc = subprocess.Popen(argv, cwd=cwd, env={**env, "PYTHONPATH": str(repo)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        if interrupt_after is not None:
            time.sleep(interrupt_after)
            proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=600)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        after = sorted(p.name for p in out_dir.iterdir())
        new = [n for n in after if n not in before]
        written_ok = expect == "accept" and new == ["ok.parquet"]
        made_runs = [p.name for p in cwd.rglob("*")]
        traceback = "Traceback" in err or "Exception ignored" in err
        if proc.returncode == 0:
            outcome = "accepted"
        elif traceback:
            outcome = "traceback"
        elif len(errors) == 1:
            outcome = "error"
        elif proc.returncode == 2 and err.strip():
            outcome = "error"  # the argument parser's (tyro's) own message, exit status 2
        else:
            outcome = f"{len(errors)} error lines"
        rows.append({
            "group": "cli", "case": name, "expect": expect, "outcome": outcome, "exit": proc.returncode,
            "error": (errors[0] if errors else err.strip().splitlines()[-1] if err.strip() else "")[:160],
            "traceback": traceback,
            "half_written": (bool(new) and not written_ok) or bool(made_runs),
            "unchanged": all(hashlib.sha256(p.read_bytes()).hexdigest() == h for p, h in inputs_before.items()),
        })
    return rows


def _verdict(row: dict) -> bool:
    clean = row["unchanged"] and not row["half_written"] and not row.get("traceback", False)
    if row["expect"] == "accept":
        return row["outcome"] == "accepted" and clean
    if row["expect"] == "interrupt":
        return row["exit"] in (130, -2) and clean and row["outcome"] in ("error", "killed by SIGINT")
    return row["outcome"] == "error" and row.get("exit", 1) != 0 and clean  # "refuse" or "refuse at write"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repo", type=Path, default=Path(__file__).resolve().parents[1])
    parser.add_argument("--python", default=sys.executable, help="the checkout's Python (its venv)")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(args.repo.resolve(), args.worker)))
        return
    repo = args.repo.resolve()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        workdir = Path(tmp)
        worker = subprocess.run(
            [args.python, __file__, "--repo", str(repo), "--worker", str(workdir)], cwd=workdir,
            env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, capture_output=True, text=True,
        )
        if worker.returncode != 0:
            raise SystemExit(f"worker failed:\n{worker.stderr}")
        rows = json.loads(worker.stdout.strip().splitlines()[-1]) + _cli_cases(repo, args.python, workdir)
    for row in rows:
        row.setdefault("exit", 0 if row["outcome"] in ("accepted",) or row["outcome"].startswith("written") else 1)
        row.setdefault("traceback", row["outcome"].startswith("traceback"))
        if row["exit"] == -2 and row["outcome"] != "traceback":
            row["outcome"] = "killed by SIGINT"
        row["pass"] = _verdict(row)
    print(f"hostile inputs against {repo}\n")
    print("| group | case | expected | outcome | exit | traceback | half-written | inputs unchanged | verdict | message |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['group']} | {r['case']} | {r['expect']} | {r['outcome']} | {r['exit']} | "
              f"{'yes' if r['traceback'] else 'no'} | {'YES' if r['half_written'] else 'no'} | "
              f"{'yes' if r['unchanged'] else 'NO'} | {'pass' if r['pass'] else 'FAIL'} | "
              f"{r['error'][:90].replace('|', '/')} |")
    passed = sum(r["pass"] for r in rows)
    print(f"\n{passed} of {len(rows)} cases pass")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
