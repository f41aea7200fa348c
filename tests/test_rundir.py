"""mtp_occ.rundir: the run dir's names, the atomic write (whole file or nothing, readable permissions, no
temp file left) and run.json's time format."""

import os
import re

import pytest

from mtp_occ.rundir import (
    TMP_MARK,
    EvalDir,
    RunDir,
    atomic_write_bytes,
    atomic_write_text,
    checkpoint_name,
    timestamp,
)


def test_layout_names_every_file_of_a_run_dir(tmp_path):
    run = RunDir(str(tmp_path))  # a str root is stored as a Path
    assert run.root == tmp_path
    rel = {k: getattr(run, k).relative_to(tmp_path).as_posix()
           for k in ("overrides", "config", "run_json", "metrics", "metrics_prev", "checkpoints", "wandb")}
    assert rel == {"overrides": "overrides.txt", "config": "config.yaml", "run_json": "run.json",
                   "metrics": "metrics.jsonl", "metrics_prev": "metrics.jsonl.prev", "checkpoints": "checkpoints",
                   "wandb": "wandb"}
    assert run.eval == EvalDir(tmp_path / "eval") and run.base_eval.root == tmp_path / "eval" / "base"
    assert run.eval.summary == tmp_path / "eval" / "summary.json"
    assert run.eval.samples == tmp_path / "eval" / "samples.jsonl"
    assert run.eval.step_summary(50) == tmp_path / "eval" / "step_50" / "summary.json"  # not zero-padded
    assert checkpoint_name(50) == "step_000050"  # zero-padded: sorts by name
    assert run.checkpoint_eval("step_000050").root == tmp_path / "eval" / "step_000050"
    assert run.checkpoint_eval("step_000050", ["eval.k=4", "eval.limit=2"]).root.name == \
        "step_000050-eval.k=4_eval.limit=2"


def test_atomic_write_replaces_whole_files_and_keeps_them_readable(tmp_path):
    path = tmp_path / "f.json"
    atomic_write_text(path, "a")
    assert path.read_text() == "a" and path.stat().st_mode & 0o777 == 0o644  # not mkstemp's 0o600
    os.chmod(path, 0o640)
    atomic_write_text(path, (f"{i}\n" for i in range(3)), sync_dir=True)  # chunks, streamed
    assert path.read_text() == "0\n1\n2\n" and path.stat().st_mode & 0o777 == 0o640  # the old mode kept
    atomic_write_bytes(path, b"\xff")
    assert path.read_bytes() == b"\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path):
    path = tmp_path / "run.json"
    path.write_text("old")

    def chunks():
        yield "new, half"
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic_write_text(path, chunks())
    assert path.read_text() == "old" and not [p for p in tmp_path.iterdir() if TMP_MARK in p.name]


def test_timestamp_is_iso_with_its_offset():
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d{4}", timestamp())

