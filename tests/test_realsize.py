"""``benchmarks/realsize.py`` (``make realsize``) at tiny size: every path it runs at the released configs runs here
through the same code, so a change that breaks one fails CI before a GPU turn finds it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "realsize.py"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    env.pop("COMFYUI_DIR", None)  # the comfyui path has its own test run (make test-comfyui)
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)


def test_every_path_runs_at_tiny_size(tmp_path):
    out = tmp_path / "realsize.json"
    proc = _run("--tiny", "--same-process", "--full-on-cpu", "--work", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    paths = report["paths"]
    assert set(paths) == {"sizes", "build_pairs", "build_encoders", "build_vlm", "prepare", "embed_direct",
                          "embed_cot", "embed_bf16", "embed_fp16", "fit_adamw", "fit_adamw8bit", "tune_user",
                          "sample_base", "sample_adapter", "sample_full"}
    assert all(r["ok"] and r["wall_s"] > 0 and r["peak_mib"] > 0 for r in paths.values())
    assert set(report["skipped"]) == {"comfyui"} and "COMFYUI_DIR" in report["skipped"]["comfyui"]
    sizes = paths["sizes"]["sizes"]  # the released configs, counted on the meta device even at tiny size
    assert round(sizes["stage_c_lite"]["params"] / 1e9, 2) == 1.03 and round(sizes["stage_c_full"]["params"] / 1e9,
                                                                              2) == 3.59
    # the model cards: 894M and 8.03B parameters (ours count a 26-layer SigLIP tower, transformers' default: +1.7%)
    assert abs(sizes["llava_onevision_0.5b"]["params"] / 0.894e9 - 1) < 0.03
    assert abs(sizes["llava_onevision_7b"]["params"] / 8.03e9 - 1) < 0.03
    assert paths["prepare"]["latent_shape"] == [16, 2, 2]  # 64 px through the EfficientNet: /32
    assert paths["embed_direct"]["user_tokens"] == [3, 32] and paths["embed_direct"]["images"] == 8
    assert 0 < paths["embed_bf16"]["rel_error_all"] < 0.05 and 0 < paths["embed_fp16"]["rel_error_all"] < 0.05
    assert paths["fit_adamw"]["steps"] == 2 and len(paths["fit_adamw8bit"]["step_s"]) == 2
    assert paths["tune_user"]["steps"] >= 1 and paths["sample_adapter"]["latent"] == [16, 2, 2]
    # several images in one prompt: each gets only its base tile, so the image size does not change the cost
    lengths = paths["embed_direct"]["prompt_tokens_by_image_size"]
    assert lengths["32px_4_pairs"] == lengths["64px_4_pairs"] > lengths["64px_1_pairs"] == lengths["32px_1_pairs"]


def test_each_path_in_its_own_process_and_refusals(tmp_path):
    out = tmp_path / "realsize.json"
    proc = _run("--tiny", "--only", "build_pairs", "--work", str(tmp_path / "work"), "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(out.read_text())["paths"].values()
    assert row["ok"] and row["image_px"] == 64 and row["peak_mib"] > 0
    assert (tmp_path / "work" / "pairs" / "artist" / "pairs.jsonl").is_file()
    bad = _run("--tiny", "--only", "fit", "--out", str(out))
    assert bad.returncode != 0 and "Unknown path(s) ['fit']" in bad.stderr


def test_a_failing_path_fails_the_run(tmp_path):
    work, broken = tmp_path / "work", "prepare"
    assert _run("--tiny", "--only", "build_pairs", "--work", str(work), "--out", str(tmp_path / "a.json")).returncode \
        == 0
    (work / "pairs" / "artist" / "0a.png").write_bytes(b"not a png")  # prepare must fail, loudly
    (work / ".build_encoders.done").touch()  # and it fails before it would need the encoders
    proc = _run("--tiny", "--only", broken, "--work", str(work), "--out", str(tmp_path / "b.json"))
    assert proc.returncode == 1 and f"FAILED: {broken}" in proc.stderr
    assert json.loads((tmp_path / "b.json").read_text())["paths"][broken]["ok"] is False


def test_a_path_this_machine_cannot_run_is_skipped_with_its_reason(tmp_path):
    """Too little free memory is a skip with the reason in the JSON (on a shared machine, not an OOM kill), not a
    failure; the reasons of an earlier run survive --merge."""
    out, work = tmp_path / "r.json", tmp_path / "work"
    proc = _run("--tiny", "--same-process", "--only", "sample_full", "--full-on-cpu", "--reserve-gib", "1e9",
                "--work", str(work), "--out", str(out))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert "sample_full" not in report["paths"] and report["paths"]["prepare"]["ok"]
    assert "Stage C full with an adapter needs about 1.5 GiB" in report["skipped"]["sample_full"]
    assert not (work / ".sample_full.done").exists()
    proc = _run("--tiny", "--only", "build_pairs", "--merge", "--work", str(work), "--out", str(out))
    assert proc.returncode == 0 and "needs about" in json.loads(out.read_text())["skipped"]["sample_full"]
