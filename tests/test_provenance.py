"""Provenance: the environment and the exact source tree land in every run dir's run.json."""

from __future__ import annotations

import json
import platform
import subprocess

import torch

from mtp_occ.provenance import environment, numerics_key, source_tree


def _git(repo, *args):
    subprocess.run(["git", *args], cwd=repo, check=True, capture_output=True)


def test_source_tree_tells_clean_from_dirty_and_hashes_the_difference(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.py").write_text("x = 1\n")
    _git(tmp_path, "add", "a.py")
    _git(tmp_path, "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "one")
    clean = source_tree(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False and clean["diff_sha256"] is None
    (tmp_path / "a.py").write_text("x = 2\n")
    edited = source_tree(tmp_path)
    assert edited["dirty"] and edited["commit"] == clean["commit"] and len(edited["diff_sha256"]) == 64
    (tmp_path / "new.py").write_text("y = 1\n")  # an untracked file changes the hash too
    with_new = source_tree(tmp_path)
    assert with_new["diff_sha256"] != edited["diff_sha256"]
    (tmp_path / "new.py").write_text("y = 2\n")
    assert source_tree(tmp_path)["diff_sha256"] != with_new["diff_sha256"]


def test_environment_names_versions_cpu_and_threads():
    env = environment()
    assert env["packages"]["torch"] == torch.__version__
    for name in ("transformers", "math-verify", "deepspeed"):
        assert env["packages"][name]
    assert env["python"].count(".") == 2 and env["cpu"]["model"]
    assert env["torch"]["threads"] == torch.get_num_threads()
    assert env["torch"]["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert numerics_key() == {"torch": torch.__version__, "transformers": env["packages"]["transformers"],
                              "cpu_capability": "AVX2" if platform.machine() == "x86_64" else numerics_key()["cpu_capability"]}


def test_run_json_records_environment_and_source_tree(tmp_path):
    from mtp_occ.config import compose
    from mtp_occ.train import prepare_run_dir

    cfg = compose([f"run_root={tmp_path}", "name=prov"])
    run = json.loads((prepare_run_dir(cfg, ["name=prov"]) / "run.json").read_text())
    assert run["env"]["packages"]["torch"] == torch.__version__
    assert run["env"]["torch"]["threads"] == torch.get_num_threads()
    from pathlib import Path

    import mtp_occ

    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(mtp_occ.__file__).parent, capture_output=True,
                          text=True).stdout.strip()
    assert run["git"]["commit"] == run["git_commit"] == head and isinstance(run["git"]["dirty"], bool)
