"""`ppd-train fit / eval / demo` from files, as a user runs them."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from ppd_train.adapter import load_adapter
from ppd_train.cli import main
from ppd_train.embedding import save_embedding_table
from ppd_train.synthetic import World, WorldConfig, build_dataset
from ppd_train.tiny import build_tiny_stage_c


@pytest.fixture()
def files(tmp_path):
    world = World(WorldConfig(seen_users=3, unseen_users=1, unseen_mixtures=0, pairs_per_user=4), seed=0)
    data, embeddings, _ = build_dataset(world, seed=0)
    data.save(tmp_path / "data.safetensors")
    save_embedding_table(tmp_path / "users.safetensors", embeddings)
    build_tiny_stage_c(seed=0).save_pretrained(tmp_path / "stage_c")
    (tmp_path / "rewards.py").write_text("def brightness(user_id, latents, caption_idx):\n"
                                         "    return latents.mean(dim=(1, 2, 3))\n")
    return tmp_path


def test_fit_then_eval_from_config_files(files, capsys, monkeypatch):
    cfg = files / "fit.toml"
    cfg.write_text(f'stage_c = "{files / "stage_c"}"\ndata = "{files / "data.safetensors"}"\n'
                   f'embeddings = "{files / "users.safetensors"}"\nout_dir = "{files / "run"}"\n'
                   "max_steps = 3\nbatch_size = 4\nlr = 1e-2\nbeta = 100.0\ntensorboard = false\n")
    assert main(["fit", "--config", str(cfg), "--set", "checkpoint_every=2", "--quiet"]) == 0
    adapter = load_adapter(files / "run" / "adapter.safetensors")
    assert adapter.config.training["steps"] == 3
    assert main(["fit", "--config", str(cfg), "--print-config"]) == 0
    assert "max_steps = 3" in capsys.readouterr().out
    assert main(["fit", "--config", str(cfg), "--set", "max_steps=x"]) == 2
    assert "'max_steps': expected an integer" in capsys.readouterr().err

    monkeypatch.syspath_prepend(str(files))
    ev = files / "eval.yaml"
    ev.write_text(f"stage_c: {files / 'stage_c'}\nadapter: {files / 'run' / 'adapter.safetensors'}\n"
                  f"embeddings: {files / 'users.safetensors'}\ndata: {files / 'data.safetensors'}\n"
                  f"reward: rewards:brightness\nsamples: 4\nsteps: 4\nout: {files / 'metrics.json'}\n")
    assert main(["eval", "--config", str(ev)]) == 0
    metrics = json.loads((files / "metrics.json").read_text())
    # fit held one of the 3 training users out (reported apart); the fourth user was never in the data
    assert metrics["seen"]["users"] == 2 and metrics["heldout"]["users"] == 1 and metrics["unseen"]["users"] == 1
    assert all(0.0 <= m["win_rate"] <= 1.0 for m in metrics["users"].values())
    ev.write_text(ev.read_text().replace("rewards:brightness", "rewards:nope"))
    assert main(["eval", "--config", str(ev)]) == 2
    assert "cannot be imported" in capsys.readouterr().err
    sys.modules.pop("rewards", None)


def test_fit_in_bf16_loads_the_frozen_stage_c_in_bf16(files, monkeypatch, request):
    """Under mixed_precision=bf16 `fit` loads Stage C straight into bf16 (never a float32 copy first) and still writes a
    float32 adapter that learned."""
    from accelerate.state import AcceleratorState

    from ppd_train import stage_c
    from ppd_train.adapter import read_adapter_config

    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process: a fresh state here
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    loaded, real = [], stage_c.load_stage_c

    def load(*a, **k):  # the real loader; the dtype as loaded (the Trainer would cast a float32 one later)
        unet = real(*a, **k)
        loaded.append(next(unet.parameters()).dtype)
        return unet

    monkeypatch.setattr(stage_c, "load_stage_c", load)
    assert main(["fit", "--set", f"stage_c={files / 'stage_c'}", "--set", f"data={files / 'data.safetensors'}",
                 "--set", f"embeddings={files / 'users.safetensors'}", "--set", f"out_dir={files / 'bf16'}",
                 "--set", "mixed_precision=bf16", "--set", "max_steps=2", "--set", "batch_size=4",
                 "--set", "lr=1e-2", "--set", "beta=100", "--set", "tensorboard=false", "--quiet"]) == 0
    assert loaded == [torch.bfloat16]
    tensors = read_adapter_config(files / "bf16" / "adapter.safetensors")[1]
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "to_v" in k)


def test_fit_refuses_missing_embeddings(files, capsys):
    from ppd_train.embedding import load_embedding_table

    table, _ = load_embedding_table(files / "users.safetensors")
    save_embedding_table(files / "few.safetensors", {k: v for k, v in table.items() if k != "seen00"})
    assert main(["fit", "--set", f"stage_c={files / 'stage_c'}", "--set", f"data={files / 'data.safetensors'}",
                 "--set", f"embeddings={files / 'few.safetensors'}", "--set", f"out_dir={files / 'r'}"]) == 2
    assert "no embedding for 1 of the 3 training users" in capsys.readouterr().err


def test_demo_prints_its_config(capsys):
    assert main(["demo", "--print-config", "--set", "world.k_styles=6", "--set", "train.max_steps=7"]) == 0
    out = capsys.readouterr().out
    assert "[world]" in out and "k_styles = 6" in out and "[train]" in out and "max_steps = 7" in out
    assert "beta = 1000.0" in out  # overriding one train key keeps the demo's other train defaults


def _torchrun(folder: Path, *args: str, check: bool = True) -> tuple[int, str, str]:
    """Run ``args`` as two CPU processes under torchrun (gloo, what ``accelerate launch --multi_gpu`` starts on GPUs)
    in ``folder``: (exit status, stdout, stderr); with ``check``, a non-zero status fails the test. A hang (two
    processes out of step in an all-reduce) fails the test, leaving no worker behind; output goes to files, not
    pipes, which a stuck worker would hold open."""
    import contextlib
    import os
    import signal
    import subprocess

    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "true"}
    out, err = folder / "torchrun.out", folder / "torchrun.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env, cwd=folder, start_new_session=True)
        try:
            proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            proc.terminate()  # torchrun stops its workers (they run in process groups of their own)
            try:
                proc.wait(timeout=30)
            finally:
                with contextlib.suppress(ProcessLookupError):  # gone already, as it should be
                    os.killpg(proc.pid, signal.SIGKILL)
            pytest.fail("the two processes hung (one waits in an all-reduce the other never joins)")
    if check:
        assert proc.returncode == 0, err.read_text()[-3000:]
    return proc.returncode, out.read_text(), err.read_text()


def test_a_nan_batch_on_one_process_skips_the_step_on_all(tmp_path):
    """Two processes, a NaN in process 1's first batch: both run backward (a process that skipped it would leave the
    other waiting in the gradient all-reduce: a hang), both skip step 1 and train steps 2 and 3, and their adapters
    stay identical. Judged on what each worker wrote when it finished; a worker that failed before that fails the
    test, one that crashed while exiting afterwards (torch's teardown, not the code under test) is reported."""
    status, _, err = _torchrun(tmp_path, str(Path(__file__).with_name("ddp_nan_worker.py")), str(tmp_path),
                               check=False)
    reports = [tmp_path / f"rank{r}.json" for r in (0, 1)]
    missing = [p.name for p in reports if not p.is_file()]
    assert not missing, f"torchrun exited {status}; no {', '.join(missing)}:\n{err[-3000:]}"
    for r, path in enumerate(reports):
        seen = json.loads(path.read_text())
        assert seen["rank"] == r and seen["skipped"] == [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
        assert seen["apart"] == 0.0 and seen["moved"] > 0
    if status != 0:
        warnings.warn(f"torchrun exited {status} after both workers wrote their results:\n{err[-2000:]}",
                      stacklevel=1)


def test_fit_distributed_with_two_processes(files):
    """The multi-GPU path with no code change, run for real as two CPU processes: the global batch counts both
    processes, the main process alone writes the adapter and reports it."""
    cfg = files / "fit.toml"
    cfg.write_text(f'stage_c = "{files / "stage_c"}"\ndata = "{files / "data.safetensors"}"\n'
                   f'embeddings = "{files / "users.safetensors"}"\nout_dir = "{files / "ddp"}"\n'
                   "max_steps = 3\nbatch_size = 2\nlr = 1e-2\nbeta = 100.0\ntensorboard = false\n")
    _, out, _ = _torchrun(files, "-m", "ppd_train", "fit", "--config", str(cfg), "--quiet")
    assert out.count("adapter ->") == 1
    adapter = load_adapter(files / "ddp" / "adapter.safetensors")
    assert adapter.config.training["steps"] == 3 and adapter.config.training["batch_pairs"] == 4
    assert adapter.blocks[0].to_v.weight.abs().sum() > 0  # trained: a fresh adapter's to_v is exactly zero
