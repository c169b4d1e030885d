"""``make realsize``'s nodes path at tiny size on a real ComfyUI: ComfyUI's own Stage C patched by Apply PPD Adapter,
through the same code ``make realsize`` runs at the lite config (so a break shows before a GPU turn)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_the_nodes_path_of_realsize_runs_at_tiny_size(tmp_path):
    out = tmp_path / "realsize.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "realsize.py"), "--tiny", "--same-process",
                           "--only", "comfyui", "--work", str(tmp_path / "work"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    row = json.loads(out.read_text())["paths"]["comfyui"]
    assert row["ok"] and set(row["forward_s"]) == {"base", "ppd"}
