"""The GPU job runner packs every job's log into one archive after each job and names each job's exit status,
so a call cut short still returns what finished; jobs that need assets say which."""

from __future__ import annotations

import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "scripts" / "gpu_jobs.sh"


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("tar") is None, reason="needs bash and tar")
def test_jobs_run_in_turn_and_each_leaves_its_log_in_the_archive(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out"), "no-such-job", "sp-quality:30",
                          "ts-sweep8k:30"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1  # a job failed
    summary = (tmp_path / "out" / "summary.txt").read_text().splitlines()
    assert [line.split(":")[0] for line in summary] == ["no-such-job", "sp-quality", "ts-sweep8k"]
    assert all(" rc 2," in line for line in summary)
    with tarfile.open(tmp_path / "out" / "results.tar.gz") as tar:
        names = {Path(n).as_posix().lstrip("./") for n in tar.getnames()}
        log = tar.extractfile("./sp-quality/sp-quality.log").read().decode()
    assert {"summary.txt", "no-such-job/no-such-job.log", "sp-quality/sp-quality.log"} <= names
    assert "needs GGUF" in log
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["results.tar.gz", "summary.txt"]


def test_without_jobs_it_prints_its_usage(tmp_path):
    run = subprocess.run(["bash", str(SCRIPT), str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 2 and "Jobs (default limits" in run.stderr
    assert "hr-balanced" in run.stderr and "sp-real" in run.stderr and "python3 must see torch" in run.stderr
    assert "set -uo" not in run.stderr  # the header only
