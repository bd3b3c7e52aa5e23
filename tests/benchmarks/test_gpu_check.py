"""benchmarks/gpu_check.py's dry run: on a machine without CUDA every check runs its CPU side and
reports its CUDA side skipped, none fails, and the results file lists them all."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import OFFLINE_ENV

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.py"
CHECKS = ["extract", "detect", "labeler", "historynet", "ray", "torchrun"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run's skips are those of a machine without CUDA")
def test_the_dry_run_runs_every_checks_cpu_side_and_skips_its_cuda_side(tmp_path):
    results = tmp_path / "results.json"
    env = {**os.environ, **OFFLINE_ENV, "MHMD_WEIGHTS_DIR": str(tmp_path / "no-weights")}
    run = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--json", str(results)], env=env,
                         capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stdout + run.stderr
    checks_part, _, headlines = run.stdout.partition("\nheadline ")
    lines = {line.split()[0]: line for line in checks_part.splitlines() if line.strip() and line.split()[0] in CHECKS}
    assert list(lines) == CHECKS and "extract --decoder cuda / CPU decode (" in headlines
    for name in CHECKS:
        assert lines[name].split()[1] == "skipped" and "skipped: no CUDA" in lines[name], lines[name]
    written = json.loads(results.read_text())
    assert written["dry_run"] and list(written["checks"]) == CHECKS
    assert {r["status"] for r in written["checks"].values()} == {"skipped"}
    # each CPU side ran: its numbers are there
    checks = written["checks"]
    assert checks["extract"]["metrics"]["sampled_frames"] == 2 and checks["extract"]["metrics"]["extract_cpu_film_s_per_s"] > 0
    assert checks["detect"]["metrics"]["cpu_persons_agreement"] == 1.0
    assert checks["detect"]["metrics"]["torchvision_cpu_jpeg_difference"] <= 1.0
    assert checks["labeler"]["metrics"]["cpu_images"] == 4
    assert set(checks["historynet"]["metrics"]["first_step_l2_ab"]) == {"fp32", "bf16"}
    assert checks["ray"]["metrics"]["gpus_per_extract_worker"] == 0.125 and checks["torchrun"]["metrics"]["torchrun"]
    assert [h["target"] for h in written["headlines"]] == ["-", ">= 3x", ">= 2000", ">= 1x", "-", ">= 1000"]
    assert all(h["value"] is None for h in written["headlines"])


def test_a_failing_or_late_check_is_one_line_with_the_numbers_it_had(tmp_path):
    sys.path.insert(0, str(SCRIPT.parent))
    import gpu_check

    def broken(ctx):
        ctx.note(before=1)
        raise ValueError("no such thing\nsecond line")

    def slow(ctx):
        import time
        time.sleep(5)

    ctx = gpu_check.Context(True, tmp_path, False)
    failed = gpu_check.run_check(gpu_check.Check("broken", broken, 10), ctx)
    assert failed["status"] == "failed" and failed["detail"] == "ValueError: no such thing"
    assert failed["metrics"] == {"before": 1} and "Traceback" in failed["traceback"]
    late = gpu_check.run_check(gpu_check.Check("slow", slow, 0.2), gpu_check.Context(True, tmp_path, False))
    assert late["status"] == "failed" and late["detail"] == "timed out after 0.2 s" and late["seconds"] < 2
