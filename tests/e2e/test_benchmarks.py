"""The GPU throughput benchmark runs end to end in its CPU `--small` mode and reports every phase."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PHASES = ["generation, batch 1", "generation, batch_size auto", "generation, merged", "judgment (",
          "judgment, judge.share_prompts", "bare forward", "DPO step, judged reference columns",
          "DPO step, online reference forward"]


def test_gpu_throughput_small_runs_every_phase(tmp_path):
    out = tmp_path / "rows.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--small", "--json",
                           str(out)], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    phases = [row["phase"] for row in result["rows"]]
    for phase in PHASES:
        assert any(p.startswith(phase) for p in phases), (phase, phases)
    assert all(row["tokens_per_second"] > 0 and row["seconds"] > 0 for row in result["rows"])
    parts = sum(v for k, v in result["projection"].items() if k != "total_h")
    assert result["projection"]["total_h"] == pytest.approx(parts)
    assert "| generation, batch_size auto |" in proc.stdout and "projected paper recipe" in proc.stdout


def test_gpu_throughput_judgment_only_prints_each_repeat():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_throughput.py"), "--small",
                           "--judgment-only", "2"], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    repeats = [line for line in proc.stdout.splitlines() if line.strip().startswith("repeat")]
    assert len(repeats) == 2 and all("x the bare forward; share_prompts" in line for line in repeats)
