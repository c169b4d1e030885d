"""The trainer on a small synthetic world: exact resume, safe checkpoints, clear errors, a usable adapter."""

from __future__ import annotations

import dataclasses
import json
import math
import re
from types import SimpleNamespace

import pytest
import torch
from helpers import stage_c_inputs

from ppd_train import optim, safetensors_io, train
from ppd_train.adapter import load_adapter, read_adapter_config
from ppd_train.checkpoint import find_latest
from ppd_train.config import ConfigError, load_config
from ppd_train.dpo_data import DPOData
from ppd_train.errors import PPDError
from ppd_train.optim import adamw
from ppd_train.stage_c import PPDBinding
from ppd_train.synthetic import World, WorldConfig, build_dataset
from ppd_train.tiny import build_tiny_stage_c
from ppd_train.train import TrainConfig, Trainer, _Logger, batch_indices

WORLD = WorldConfig(seen_users=4, unseen_users=1, unseen_mixtures=0, pairs_per_user=6, embedding_views=2)


@pytest.fixture(scope="module")
def world_data():
    world = World(WORLD, seed=0)
    data, embeddings, views = build_dataset(world, seed=0)
    return world, data, embeddings, views


def _cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(out_dir=str(tmp_path / "run"), max_steps=6, batch_size=4, lr=1e-2, beta=100.0, checkpoint_every=2,
                keep_checkpoints=2, val_fraction=0.2, val_every=3, log_every=1, tensorboard=False)
    base.update(kw)
    return TrainConfig(**base)


def _trainer(cfg, world_data):
    _, data, embeddings, views = world_data
    return Trainer(cfg, build_tiny_stage_c(seed=0), data, views, embeddings["seen00"].embedder, show_progress=False)


def _tensors(path):
    return read_adapter_config(path)[1]


def test_batch_order_is_a_pure_function_of_the_cursor():
    full = batch_indices(0, 25, 10, seed=3)
    assert sorted(full[:10].tolist()) == list(range(10))  # each epoch is a permutation
    assert torch.equal(batch_indices(7, 11, 10, seed=3), full[7:18])


def test_reference_pass_leaves_adapter_untouched(tmp_path, world_data):
    trainer = _trainer(_cfg(tmp_path), world_data)
    before = {k: v.clone() for k, v in trainer.adapter.state_dict().items()}
    trainer.train_step()
    trainer.train_step()
    inputs = stage_c_inputs(batch=2, size=4)
    with torch.no_grad(), trainer.binding.adapter_off():
        ref = trainer.unet(**inputs).sample
    trainer.detach()
    with torch.no_grad():
        assert torch.equal(ref, trainer.unet(**inputs).sample)  # adapter off == the base model
    changed = [k for k, v in trainer.adapter.state_dict().items() if not torch.equal(v, before[k])]
    assert changed  # training moved the adapter (test_train_invariants checks the reference pass on values)


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_kill_and_resume_gives_the_same_adapter(tmp_path, world_data, optimizer, monkeypatch):
    monkeypatch.setattr(optim, "MIN_8BIT_SIZE", 1)  # the tiny adapter's tensors are small: 8-bit codes for all of them
    straight_trainer = _trainer(_cfg(tmp_path / "a", optimizer=optimizer), world_data)
    straight = straight_trainer.run()
    state = next(iter(straight_trainer.optimizer.state.values()))
    assert ("exp_avg_ratio_codes" in state) == (optimizer == "adamw8bit")

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt  # Ctrl+C after step 5; the last checkpoint is step 4

    with pytest.raises(KeyboardInterrupt):
        _trainer(_cfg(tmp_path / "b", optimizer=optimizer), world_data).run(on_step=kill)
    assert find_latest(tmp_path / "b" / "run" / "checkpoints").name == "step-00000004.safetensors"
    resumed = _trainer(_cfg(tmp_path / "b", optimizer=optimizer), world_data)
    path = resumed.run()
    a, b = _tensors(straight), _tensors(path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "b" / "run" / "checkpoints").glob("step-*"))) == 2  # keep-last-K


def test_a_resumed_run_shows_its_progress_from_the_resumed_step(tmp_path, world_data, capsys, monkeypatch):
    """The progress bar of a resumed run starts at the resumed step and counts steps to the budget (none is shown
    with show_progress off); each log line leads with its step, its speed counts only this session's steps and its
    epoch is the pairs seen over the training pairs."""
    def kill(step):
        if step == 3:
            raise KeyboardInterrupt  # the last checkpoint is step 2

    with pytest.raises(KeyboardInterrupt):
        _trainer(_cfg(tmp_path), world_data).run(on_step=kill)
    assert "PPD fit" not in capsys.readouterr().err
    clock = iter(100.0 + 0.25 * i for i in range(1000))  # a quarter second per reading (not from 0): a known time
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    _, data, embeddings, views = world_data
    trainer = Trainer(_cfg(tmp_path), build_tiny_stage_c(seed=0), data, views, embeddings["seen00"].embedder,
                      show_progress=True)
    trainer.run()
    bar = capsys.readouterr().err
    assert "PPD fit:  33%" in bar and "| 2/6 [" in bar and "PPD fit: 100%" in bar and "| 6/6 [" in bar, bar
    assert re.search(r"(step/s|s/step), acc=\d\.\d\d, loss=\d\.\d{4}\]", bar), bar
    assert "| 6/6 [" in bar.rstrip().split("\r")[-1], bar  # one step per step: its last state is the budget
    lines = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    assert all(line.startswith('{"step": ') for line in lines)
    assert lines[0].startswith('{"step": 1, "loss": ')
    resumed = [json.loads(line) for line in lines if '"loss"' in line][-4:]
    assert [v["step"] for v in resumed] == [3, 4, 5, 6]
    for v in resumed:  # (step - 2) steps of this session in 0.25 s each
        assert v["pairs_per_s"] == pytest.approx(trainer.pairs_per_step / 0.25)
        assert v["epoch"] == pytest.approx(v["step"] * trainer.pairs_per_step / len(trainer.train))


def test_only_the_main_process_logs(tmp_path):
    """Under `accelerate launch` the other processes write no log line and open no TensorBoard writer."""
    other = _Logger(tmp_path, tensorboard=True, main=False)
    other.log(1, {"loss": 0.5})
    other.close()
    assert other.writer is None and list(tmp_path.iterdir()) == []
    main = _Logger(tmp_path, tensorboard=False, main=True)
    main.log(1, {"loss": 0.5})
    assert main.writer is None and [p.name for p in tmp_path.iterdir()] == ["train_log.jsonl"]


def test_optimizer_is_fused_where_torch_has_the_kernel(tmp_path, world_data):
    trainer = _trainer(_cfg(tmp_path), world_data)
    assert trainer.optimizer.optimizer.defaults["fused"]  # CPU has a fused AdamW in this torch
    opt = adamw([torch.nn.Parameter(torch.zeros(2))], 1e-3, 0.01)
    assert opt.defaults["fused"] and (opt.defaults["lr"], opt.defaults["weight_decay"]) == (1e-3, 0.01)


@pytest.mark.parametrize("precision", ["no", "bf16"])
def test_checkpointing_accumulation_and_bf16_resume_exactly(tmp_path, world_data, precision, request):
    """Gradient checkpointing + gradient accumulation (+ bf16 autocast): training moves the adapter, and a run
    killed mid-way resumes to the same adapter as an uninterrupted one."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process: a fresh state per case
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    kw = dict(gradient_checkpointing=True, grad_accum=2, mixed_precision=precision, max_steps=4)
    straight = _trainer(_cfg(tmp_path / "a", **kw), world_data).run()

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _trainer(_cfg(tmp_path / "b", **kw), world_data).run(on_step=kill)
    a, b = _tensors(straight), _tensors(_trainer(_cfg(tmp_path / "b", **kw), world_data).run())
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert a["blocks.0.to_v.weight"].abs().sum() > 0 and torch.isfinite(a["blocks.0.to_v.weight"]).all()
    assert read_adapter_config(straight)[0].training["batch_pairs"] == 8


@pytest.mark.parametrize("precision, asked, held", [("bf16", "auto", torch.bfloat16),
                                                     ("bf16", "float32", torch.float32),
                                                     ("no", "auto", torch.float32)])
def test_the_frozen_stage_c_is_bf16_under_bf16_autocast(tmp_path, world_data, precision, asked, held, request):
    """Under mixed_precision=bf16 the frozen Stage C is held in bf16 (half its memory; autocast computes its matmuls
    in bf16 anyway), the adapter stays float32 and learns; stage_c_dtype=float32 keeps it float32. A checkpoint from
    before the key (float32 Stage C) resumes only where the Stage C is still float32."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    cfg = _cfg(tmp_path, mixed_precision=precision, stage_c_dtype=asked, max_steps=2)
    trainer = _trainer(cfg, world_data)
    assert {p.dtype for p in trainer.unet.parameters()} == {held}
    before = [p.detach().clone() for p in trainer.adapter.parameters()]
    assert {p.dtype for p in before} == {torch.float32}
    stats = trainer.train_step()
    assert math.isfinite(stats["loss"]) and stats["skipped"] == 0.0
    assert any(not torch.equal(a, p) for a, p in zip(before, trainer.adapter.parameters()))
    assert cfg.resume_key()["stage_c_dtype"] == str(held).removeprefix("torch.")


def test_disk_full_while_saving_keeps_previous_checkpoint(tmp_path, world_data, monkeypatch):
    trainer = _trainer(_cfg(tmp_path), world_data)
    for _ in range(2):
        trainer.train_step()
    good = trainer.save_checkpoint()
    for _ in range(2):
        trainer.train_step()

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors_io.os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        trainer.save_checkpoint()
    monkeypatch.undo()
    folder = tmp_path / "run" / "checkpoints"
    assert [p.name for p in folder.iterdir()] == [good.name]  # no partial file, no temporary left behind
    fresh = _trainer(_cfg(tmp_path), world_data)
    assert fresh.resume() and fresh.step == 2


def test_resume_with_another_config_is_refused(tmp_path, world_data):
    _trainer(_cfg(tmp_path, max_steps=2), world_data).run()
    with pytest.raises(PPDError, match="changed: lr"):
        _trainer(_cfg(tmp_path, max_steps=4, lr=5e-3), world_data).run()
    forced = _trainer(_cfg(tmp_path, max_steps=4, lr=5e-3), world_data)
    forced.run(force=True)
    assert forced.step == 4
    longer = _trainer(_cfg(tmp_path, max_steps=6, lr=5e-3), world_data)  # max_steps may change: the run goes on
    longer.run()
    assert longer.step == 6


def test_resume_across_optimizers(tmp_path, world_data):
    """Another optimizer is another run; a checkpoint from before the keys existed was AdamW with a float32 Stage C
    and resumes as such."""
    import json

    from safetensors.torch import load_file, save_file

    _trainer(_cfg(tmp_path, max_steps=2), world_data).run()
    with pytest.raises(PPDError, match="changed: optimizer"):
        _trainer(_cfg(tmp_path, max_steps=4, optimizer="adamw8bit"), world_data).run()
    path = find_latest(tmp_path / "run" / "checkpoints")
    meta = json.loads(safetensors_io.read_safetensors(path, "checkpoint")[1]["ppd_checkpoint"])
    tensors = load_file(path)
    unknown = {**meta, "config": {k: v for k, v in meta["config"].items() if k != "beta"}}
    save_file(tensors, path, {"ppd_checkpoint": json.dumps(unknown)})
    with pytest.raises(PPDError, match="changed: beta"):  # a key the checkpoint does not record cannot be vouched for
        _trainer(_cfg(tmp_path, max_steps=4), world_data).resume()
    del meta["config"]["optimizer"], meta["config"]["stage_c_dtype"]  # as written before the keys existed
    for key in ("users", "best", "bad_rounds", "last"):  # and before selection and the embedding check
        del meta[key]
    save_file(tensors, path, {"ppd_checkpoint": json.dumps(meta)})
    older = _trainer(_cfg(tmp_path, max_steps=4), world_data)
    assert older.resume() and (older.step, older.best, older.bad_rounds, older.last) == (2, None, 0, {})
    older.run()
    assert older.step == 4
    assert not _trainer(_cfg(tmp_path / "fresh"), world_data).resume()  # nothing to resume from


def test_nan_loss_is_skipped_then_stops(tmp_path, world_data, capsys):
    trainer = _trainer(_cfg(tmp_path, max_nan_steps=3), world_data)
    trainer.cfg.beta = float("nan")  # validate() refuses a NaN beta: poison the loss after it
    before = {k: v.clone() for k, v in trainer.adapter.state_dict().items()}
    with pytest.raises(PPDError, match="NaN/inf for 3 steps in a row"):
        trainer.run()
    assert "step skipped" in capsys.readouterr().out
    assert all(torch.equal(v, before[k]) for k, v in trainer.adapter.state_dict().items())


def test_final_adapter_personalises_through_the_node_loader(tmp_path, world_data):
    world, _, embeddings, _ = world_data
    path = _trainer(_cfg(tmp_path, max_steps=4), world_data).run()
    adapter = load_adapter(path)
    summary = adapter.config.training
    assert summary["steps"] == 4 and summary["beta"] == 100.0 and summary["embedder"] == "pairdiff:synthetic-phi"
    assert "data_hash" in summary and "val_pairs_loss" in summary["last"]
    unet = build_tiny_stage_c(seed=0)
    binding = PPDBinding(unet, adapter)
    inputs = stage_c_inputs(batch=1, size=4)
    with torch.no_grad():
        base = unet(**inputs).sample
        with binding.user(adapter(embeddings["seen00"].tokens)):
            personal = unet(**inputs).sample
    assert (personal - base).abs().max() > 1e-4
    assert (tmp_path / "run" / "train_log.jsonl").read_text().count('"val_pairs_loss"') >= 1


def test_bad_configs_and_data(tmp_path, world_data):
    bad = tmp_path / "bad.toml"
    bad.write_text("lr = 1e-4\nlearning_rate = 3\n")
    with pytest.raises(ConfigError, match="Unknown config key.*learning_rate"):
        load_config(TrainConfig, bad)
    bad.write_text('max_steps = "many"\n')
    with pytest.raises(ConfigError, match="'max_steps': expected an integer"):
        load_config(TrainConfig, bad)
    yaml = tmp_path / "ok.yaml"
    yaml.write_text("lr: 0.001\nbatch_size: 8\n")
    cfg = load_config(TrainConfig, yaml, ["beta=500", "mixed_precision=bf16"])
    assert cfg.lr == 1e-3 and cfg.batch_size == 8 and cfg.beta == 500.0 and cfg.mixed_precision == "bf16"
    with pytest.raises(PPDError, match="user_dropout"):
        dataclasses.replace(cfg, user_dropout=1.5).validate()
    with pytest.raises(PPDError, match="optimizer must be adamw or adamw8bit.*--set KEY=VALUE"):
        dataclasses.replace(cfg, optimizer="adam8bit").validate()
    _, data, embeddings, _ = world_data
    partial = {k: v for k, v in embeddings.items() if k != "seen01"}
    with pytest.raises(PPDError, match="no embedding for 1 of the 4 training users.*seen01"):
        data.user_tokens(partial)
    with pytest.raises(PPDError, match="no usable pairs"):
        DPOData(torch.zeros(0, 16, 4, 4), torch.zeros(0, 16, 4, 4), torch.zeros(0, dtype=torch.long),
                torch.zeros(0, dtype=torch.long), data.text, data.pooled, [])


def test_adapter_that_does_not_fit_the_checkpoint(tmp_path, world_data):
    _trainer(_cfg(tmp_path, max_steps=2), world_data).run()
    _, data, embeddings, views = world_data
    other = Trainer(_cfg(tmp_path, max_steps=2), build_tiny_stage_c(seed=0, width=48, clip_dim=32), data, views,
                    "pairdiff:synthetic-phi", show_progress=False)
    with pytest.raises(PPDError, match="another adapter"):
        other.run()
