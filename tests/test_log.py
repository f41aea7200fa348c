"""RunLogger: metrics.jsonl first and intact across resumes, a stable wandb id, wandb never fatal."""

import json
import warnings

import pytest
from fixtures_runs import isolate_wandb, reset_wandb

from analysis.runs import find_wandb_files, load_wandb_offline
from mtp_occ import log
from mtp_occ.eval.runner import flat_metrics
from mtp_occ.log import RunLogger, WandbFallbackWarning, read_metrics, update_run_json


@pytest.fixture(autouse=True)
def _wandb_sandbox(monkeypatch, tmp_path):
    isolate_wandb(monkeypatch, tmp_path)
    monkeypatch.setattr(log, "_warned_offline", False)
    yield
    reset_wandb()


def _lines(run_dir):
    return (run_dir / "metrics.jsonl").read_text().splitlines()


def test_metrics_are_on_disk_before_wandb_sees_them(tmp_path):
    seen = []

    class FakeRun:  # what wandb.log finds on disk at the moment it is called
        def log(self, metrics, step):
            seen.append((step, json.loads(_lines(tmp_path)[-1])))

    logger = RunLogger(tmp_path, config={}, name="r", mode="disabled")
    logger._wandb_run = FakeRun()
    logger.log({"reward/mean": 0.5}, step=1)
    logger.log({"reward/mean": 0.7, "loss/pg": 0.1}, step=2)
    assert seen == [(1, {"step": 1, "reward/mean": 0.5}),
                    (2, {"step": 2, "reward/mean": 0.7, "loss/pg": 0.1})]


def test_resume_drops_later_steps_and_the_torn_line(tmp_path):
    complete = [json.dumps({"step": s, "reward/mean": s / 10}) for s in range(1, 6)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(complete) + '\n{"step": 6, "rewa')
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3, 4, 5]  # the torn line is skipped

    logger = RunLogger(tmp_path, config={}, name="r", mode="disabled", resume_step=3)
    assert _lines(tmp_path) == complete[:3]
    logger.log({"reward/mean": 0.45}, step=4)
    logger.finish()
    steps = [(r["step"], r["reward/mean"]) for r in read_metrics(tmp_path)]
    assert steps == [(1, 0.1), (2, 0.2), (3, 0.3), (4, 0.45)]
    assert not list(tmp_path.glob(".metrics.jsonl.*"))  # no temp file left behind


def test_fresh_start_keeps_an_old_metrics_file_aside(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "x": 1}\n')
    with pytest.warns(UserWarning, match="fresh start"):
        RunLogger(tmp_path, config={}, name="r", mode="disabled").finish()
    assert (tmp_path / "metrics.jsonl").read_text() == ""
    assert (tmp_path / "metrics.jsonl.prev").read_text() == '{"step": 1, "x": 1}\n'


def test_other_ranks_write_nothing(tmp_path):
    logger = RunLogger(tmp_path / "run", config={}, name="r", mode="offline", rank=1)
    logger.log({"x": 1.0}, step=1)
    logger.log({"eval/average/avg": 0.5}, step=1, samples_path=tmp_path / "samples.jsonl")
    logger.finish()
    assert not (tmp_path / "run").exists()


def test_update_run_json_keeps_other_keys(tmp_path):
    (tmp_path / "run.json").write_text(json.dumps({"name": "r", "status": "running"}))
    update_run_json(tmp_path, status="finished")
    assert json.loads((tmp_path / "run.json").read_text()) == {"name": "r", "status": "finished"}


def test_wandb_id_is_stable_across_a_resume_and_attempts_merge(tmp_path):
    run_dir = tmp_path / "sweep" / "r"
    run_dir.mkdir(parents=True)
    update_run_json(run_dir, name="r", status="running", wandb_id=None)
    first = RunLogger(run_dir, config={"seed": 3}, name="r", mode="offline")
    for step in (1, 2, 3):
        first.log({"reward/mean": step / 10}, step=step)
    run_id = first.wandb_run.id
    first.finish("failed")  # the job dies after step 3; its checkpoint is step 2

    second = RunLogger(run_dir, config={"seed": 3}, name="r", mode="offline", resume_step=2)
    assert second.wandb_run.id == run_id == json.loads((run_dir / "run.json").read_text())["wandb_id"]
    for step in (3, 4):
        second.log({"reward/mean": step / 10 + 0.05}, step=step)
    second.finish()

    files = find_wandb_files(run_dir)
    assert len(files) == 2 and all(f.name == f"run-{run_id}.wandb" for f in files)
    frame = load_wandb_offline(run_dir)
    assert frame["run"].unique().tolist() == ["r"]
    merged = dict(zip(frame["step"], frame["value"], strict=True))
    assert merged == pytest.approx({1: 0.1, 2: 0.2, 3: 0.35, 4: 0.45})  # step 3: the second attempt's
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4]


def test_online_without_login_falls_back_to_offline_and_warns_once(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loggers = [RunLogger(tmp_path / f"r{i}", config={}, name=f"r{i}", mode="online") for i in range(2)]
        for logger in loggers:
            logger.log({"x": 1.0}, step=1)
            logger.finish()
    fallback = [w for w in caught if issubclass(w.category, WandbFallbackWarning)]
    assert len(fallback) == 1 and "wandb login" in str(fallback[0].message)
    for i in range(2):
        assert len(list((tmp_path / f"r{i}" / "wandb").glob("offline-run-*/run-*.wandb"))) == 1


def test_online_with_unreachable_server_falls_back_to_offline(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)  # a "login" for the loopback server that refuses
    monkeypatch.setattr(log, "INIT_TIMEOUT_S", 2.0)
    with pytest.warns(WandbFallbackWarning, match="could not go online"):
        logger = RunLogger(tmp_path, config={}, name="r", mode="online")
    logger.log({"x": 1.0}, step=1)
    logger.finish()
    assert len(list(tmp_path.glob("wandb/offline-run-*/run-*.wandb"))) == 1
    assert load_wandb_offline(tmp_path)[["step", "metric", "value"]].values.tolist() == [[1, "x", 1.0]]
    assert read_metrics(tmp_path) == [{"step": 1, "x": 1.0}]


def test_an_eval_logs_flat_metrics_and_a_bounded_samples_table(tmp_path, monkeypatch):
    monkeypatch.setattr(log, "TABLE_MAX_ROWS", 3)
    monkeypatch.setattr(log, "TABLE_MAX_CHARS", 20)
    samples = tmp_path / "samples.jsonl"
    samples.write_text("".join(json.dumps({"benchmark": "aime24", "id": str(i), "sample": s, "prompt": "p",
                                           "completion": "x" * 100 + "\\boxed{7}", "score": 1.0}) + "\n"
                               for i in range(5) for s in range(2)))
    aime = {"avg": 0.25, "pass": 0.5, "maj": 0.3, "avg_ci": [0.1, 0.4]}
    summary = {"step": 7, "benchmarks": {"aime24": aime},
               "average": {"avg": 0.25, "pass": 0.5, "maj": 0.3}}
    logger = RunLogger(tmp_path, config={}, name="r", mode="offline")
    logger.log(flat_metrics(summary), step=7, samples_path=samples)
    logger.finish()
    assert read_metrics(tmp_path) == [{"step": 7, "eval/aime24/avg": 0.25, "eval/aime24/pass": 0.5,
                                       "eval/aime24/maj": 0.3, "eval/average/avg": 0.25,
                                       "eval/average/pass": 0.5, "eval/average/maj": 0.3}]
    (table_file,) = tmp_path.glob("wandb/offline-run-*/files/media/table/eval/samples_*.table.json")
    table = json.loads(table_file.read_text())
    assert [row[1] for row in table["data"]] == ["0", "1", "2"]  # first sample of each problem, capped
    assert table["data"][0][4].endswith("\\boxed{7}") and len(table["data"][0][4]) < 60


def test_bad_mode_names_the_key(tmp_path):
    with pytest.raises(ValueError, match="wandb.mode"):
        RunLogger(tmp_path, config={}, name="r", mode="cloud")


def test_rewrites_keep_files_readable(tmp_path):
    update_run_json(tmp_path, name="r")
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    RunLogger(tmp_path, config={}, name="r", mode="disabled", resume_step=1).finish()
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}
