"""Model selection in `fit`: held-out users and pairs, the best adapter by a metric, early stopping, budgets, and
user dropout as the real "no user" (adapter off)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppd_train.adapter import read_adapter_config
from ppd_train.synthetic import World, WorldConfig, build_dataset
from ppd_train.tiny import build_tiny_stage_c
from ppd_train.train import TrainConfig, Trainer, budget, heldout_user_indices

WORLD = WorldConfig(seen_users=6, unseen_users=1, unseen_mixtures=0, pairs_per_user=6, embedding_views=2)


@pytest.fixture(scope="module")
def world_data():
    world = World(WORLD, seed=0)
    data, embeddings, views = build_dataset(world, seed=0)
    return data, views


def _trainer(tmp_path, world_data, **kw) -> Trainer:
    base = dict(out_dir=str(tmp_path / "run"), max_steps=6, batch_size=4, lr=1e-2, beta=100.0, checkpoint_every=2,
                keep_checkpoints=2, val_fraction=0.2, heldout_users=0.2, val_every=2, log_every=1, tensorboard=False)
    base.update(kw)
    data, views = world_data
    return Trainer(TrainConfig(**base), build_tiny_stage_c(seed=0), data, views, "pairdiff:synthetic-phi",
                   show_progress=False)


def _tensors(path):
    return read_adapter_config(path)[1]


def test_heldout_users_rule():
    assert heldout_user_indices(48, 0.1, seed=0) == heldout_user_indices(48, 0.1, seed=0)
    assert len(heldout_user_indices(48, 0.1, seed=0)) == 5  # round(4.8)
    assert len(heldout_user_indices(4, 0.1, seed=0)) == 1  # at least one from 3 users on
    assert len(heldout_user_indices(2, 0.5, seed=0)) == 1  # round(1.0)
    assert len(heldout_user_indices(2, 0.9, seed=0)) == 1  # round(1.8), but never every user
    assert heldout_user_indices(1, 0.5, seed=0) == []  # never every user
    assert heldout_user_indices(48, 0.0, seed=0) == []
    assert heldout_user_indices(48, 0.1, seed=0) != heldout_user_indices(48, 0.1, seed=1)


def test_budget_rule():
    cfg = TrainConfig()
    assert budget(cfg, n_train=1000, pairs_per_step=10) == 2000  # 20 epochs of 100 steps
    assert budget(cfg, n_train=50, pairs_per_step=10) == 300  # small data: at least 300 steps
    assert budget(cfg, n_train=10**6, pairs_per_step=10) == 20_000  # large data: at most 20k
    assert budget(TrainConfig(max_epochs=2.5), 1000, 10) == 250
    assert budget(TrainConfig(max_steps=70), 1000, 10) == 70
    assert budget(TrainConfig(max_steps=70, max_epochs=0.5), 1000, 10) == 50  # whichever ends first
    assert budget(TrainConfig(max_steps=1), 1000, 10) == budget(TrainConfig(max_epochs=0.001), 1000, 10) == 1


def test_heldout_users_are_never_trained_on(tmp_path, world_data):
    trainer = _trainer(tmp_path, world_data)
    data, _ = world_data
    held = [data.user_ids.index(u) for u in trainer.heldout_ids]
    assert len(held) == 1
    assert not torch.isin(trainer.train.user_idx, torch.tensor(held)).any()
    assert trainer.val_pairs is not None and not torch.isin(trainer.val_pairs.user_idx, torch.tensor(held)).any()
    assert trainer.val_users is not None and set(trainer.val_users.user_idx.tolist()) == set(held)
    assert len(trainer.train) + len(trainer.val_pairs) + len(trainer.val_users) == len(data)
    # the held-out user's embedding never reaches the adapter in a training step
    seen: list[torch.Tensor] = []
    hook = trainer.acc.unwrap_model(trainer.adapter).register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    for _ in range(3):
        trainer.train_step()
    hook.remove()
    held_tokens = trainer.user_tokens[held[0]]  # [V, T, D]
    for batch in seen:
        assert not any(torch.equal(row, view) for row in batch for view in held_tokens)
    values = trainer.validate()
    assert set(values) == {"val_pairs_loss", "val_pairs_implicit_acc", "val_users_loss", "val_users_implicit_acc"}
    assert all(math.isfinite(v) for v in values.values())


def test_saved_adapter_is_the_best_and_the_last_is_kept(tmp_path, world_data):
    trainer = _trainer(tmp_path, world_data, max_steps=8)
    trainer.run()
    lines = (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
    import json

    vals = [json.loads(x) for x in lines if "val_users_implicit_acc" in x]
    assert [v["step"] for v in vals] == [2, 4, 6, 8]
    best = max(vals, key=lambda v: v["val_users_implicit_acc"])  # first of the best on ties
    summary = read_adapter_config(tmp_path / "run" / "adapter.safetensors")[0].training
    assert summary["selected"] == {"metric": "val_users_implicit_acc", "step": best["step"],
                                   "value": best["val_users_implicit_acc"]}
    assert summary["heldout_users"] == trainer.heldout_ids and summary["steps"] == 8
    chosen, last = _tensors(tmp_path / "run" / "adapter.safetensors"), _tensors(
        tmp_path / "run" / "adapter_last.safetensors")
    final = trainer.acc.unwrap_model(trainer.adapter).state_dict()
    assert all(torch.equal(last[k], final[k]) for k in final)
    assert all(torch.equal(chosen[k], v) for k, v in _tensors(trainer._best_path).items())
    if best["step"] != 8:
        assert any(not torch.equal(chosen[k], last[k]) for k in chosen)


def test_select_on_a_loss_picks_the_lowest(tmp_path, world_data):
    trainer = _trainer(tmp_path, world_data, max_steps=6, select_metric="val_pairs_loss")
    trainer.run()
    import json

    vals = [json.loads(x) for x in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()
            if "val_pairs_loss" in x]
    best = min(vals, key=lambda v: v["val_pairs_loss"])
    summary = read_adapter_config(tmp_path / "run" / "adapter.safetensors")[0].training
    assert summary["selected"]["step"] == best["step"] and summary["selected"]["metric"] == "val_pairs_loss"


def test_without_selection_the_last_adapter_is_saved_and_its_summary_says_so(tmp_path, world_data):
    """select_metric = "last": adapter.safetensors is the final adapter, and the summary names that choice and the
    run (steps, data, users, recipe) as the nodes and `ppd-train inspect` show it."""
    trainer = _trainer(tmp_path, world_data, max_steps=4, select_metric="last", user_dropout=0.25, token_noise=0.1,
                       t_min=0.1, t_max=0.8)
    trainer.run()
    summary = read_adapter_config(tmp_path / "run" / "adapter.safetensors")[0].training
    assert summary["selected"] == {"metric": "last", "step": 4, "value": None}
    cfg = trainer.cfg
    assert (summary["steps"], summary["max_steps"], summary["stopped_early"]) == (4, 4, False)
    assert (summary["beta"], summary["lr"], summary["batch_pairs"]) == (cfg.beta, cfg.lr, cfg.batch_size)
    assert (summary["user_dropout"], summary["token_noise"], summary["t_min"], summary["t_max"]) == (
        cfg.user_dropout, cfg.token_noise, cfg.t_min, cfg.t_max)
    assert summary["data_hash"] == trainer.data_hash and summary["pairs"] == len(trainer.train)
    assert summary["users"] == len(trainer.data.user_ids) and summary["embedder"] == "pairdiff:synthetic-phi"
    assert summary["final_loss"] == trainer.last["loss"] and summary["last"] == json.loads(json.dumps(trainer.last))
    assert summary["base_model"] == cfg.stage_c
    assert read_adapter_config(tmp_path / "run" / "adapter_last.safetensors")[0].training == summary
    final = trainer.acc.unwrap_model(trainer.adapter).state_dict()
    chosen = _tensors(tmp_path / "run" / "adapter.safetensors")
    assert all(torch.equal(chosen[k], final[k]) for k in final)


@pytest.mark.parametrize("metric, values, best", [
    ("val_pairs_implicit_acc", [0.5, 0.75, 0.6, 0.75, 0.7], 0.75),  # higher is better; the first of a tie
    ("val_users_loss", [0.69, 0.6, 0.65, 0.6, 0.7], 0.6),  # lower is better
])
def test_selection_keeps_the_first_best_and_counts_the_rounds_since(tmp_path, world_data, metric, values, best):
    """The selection rule itself, fed a known sequence of validations: the best by the metric's direction (ties keep
    the earlier adapter), saved when it is found; validations before select_after and other metrics are ignored."""
    trainer = _trainer(tmp_path, world_data, max_steps=20, select_metric=metric)
    trainer.step = 4  # before a quarter of the budget: not counted
    trainer._select({metric: values[1]})
    assert trainer.best is None and not trainer._best_path.exists()
    for i, value in enumerate(values):
        trainer.step = 2 * i + 6
        with torch.no_grad():  # adapter i at validation i, to see which one was saved
            for p in trainer.adapter.parameters():
                p.fill_(float(i))
        trainer._select({metric: value})
    first_best = values.index(best)
    assert trainer.best == {"step": 2 * first_best + 6, "value": best}
    assert trainer.bad_rounds == len(values) - 1 - first_best
    assert all(torch.all(t == first_best) for t in _tensors(trainer._best_path).values())


def test_early_stopping_stops_and_a_rerun_does_not_train_on(tmp_path, world_data, capsys):
    # lr 0: the adapter never changes, so the metric never improves after the first validation
    kw = dict(max_steps=40, lr=1e-12, patience=2, select_metric="val_pairs_loss")
    trainer = _trainer(tmp_path, world_data, **kw)
    trainer.run()
    # validations before a quarter of the budget (select_after) do not count: 10 is the first (best), then 12, 14
    assert trainer.step == 14 and trainer.stopped_early
    assert "early stop at step 14" in capsys.readouterr().out
    summary = read_adapter_config(tmp_path / "run" / "adapter.safetensors")[0].training
    assert summary["stopped_early"] and summary["selected"]["step"] == 10 and summary["max_steps"] == 40
    again = _trainer(tmp_path, world_data, **kw)
    again.run()
    assert again.step == 14  # the finished run is found, not continued
    assert "Raise patience (it stopped early) to train on" in capsys.readouterr().out
    assert read_adapter_config(tmp_path / "run" / "adapter.safetensors")[0].training == summary


def test_selection_from_the_start(tmp_path, world_data):
    trainer = _trainer(tmp_path, world_data, max_steps=40, lr=1e-12, patience=2, select_metric="val_pairs_loss",
                       select_after=0.0)
    trainer.run()
    assert trainer.step == 6 and trainer.best is not None and trainer.best["step"] == 2


def test_kill_and_resume_selects_the_same_adapter(tmp_path, world_data):
    straight = _trainer(tmp_path / "a", world_data, max_steps=8, patience=3)
    path_a = straight.run()

    def kill(step):
        if step == 5:
            raise KeyboardInterrupt  # after the validation at 4, before the checkpoint at 6

    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "b", world_data, max_steps=8, patience=3).run(on_step=kill)
    path_b = _trainer(tmp_path / "b", world_data, max_steps=8, patience=3).run()
    a, b = _tensors(path_a), _tensors(path_b)
    assert all(torch.equal(a[k], b[k]) for k in a)
    sa = read_adapter_config(path_a)[0].training
    sb = read_adapter_config(path_b)[0].training
    timing = {"pairs_per_s"}  # the only value that may differ: wall-clock speed
    assert sa["selected"] == sb["selected"]
    assert {k: v for k, v in sa["last"].items() if k not in timing} == {
        k: v for k, v in sb["last"].items() if k not in timing}


def test_selecting_on_users_without_heldout_users_says_so(tmp_path, world_data, capsys):
    trainer = _trainer(tmp_path, world_data, heldout_users=0.0)
    assert trainer.val_users is None and trainer.select_metric == "val_pairs_implicit_acc"
    assert "needs held-out users" in capsys.readouterr().out
    neither = _trainer(tmp_path / "b", world_data, heldout_users=0.0, val_fraction=0.0)
    assert neither.select_metric == "last" and "selecting on last instead" in capsys.readouterr().out
    pairs = _trainer(tmp_path / "c", world_data, val_fraction=0.0, select_metric="val_pairs_loss")
    assert pairs.select_metric == "last" and "needs held-out pairs" in capsys.readouterr().out


def test_dropped_pairs_run_with_the_adapter_off(tmp_path, world_data):
    """User dropout trains exactly inference's "no user": the dropped rows of a training forward are bit-identical to
    the adapter-off model, so their DPO margin is 0 and they send no gradient; the other rows are personalised."""
    trainer = _trainer(tmp_path, world_data, user_dropout=0.5)
    for _ in range(3):  # a trained adapter, so "on" differs from "off"
        trainer.train_step()
    g = torch.Generator().manual_seed(3)
    inputs, users, weights, eps = trainer._inputs(trainer.train, torch.arange(8), g, dropout=0.5)
    dropped = weights == 0
    assert dropped.any() and not dropped.all()
    assert torch.equal(weights[:8], weights[8:])  # a pair's two images share the decision
    kv = trainer.adapter(users)
    with torch.no_grad():
        with trainer.binding.user(kv, weights):
            pred = trainer.unet(**inputs).sample
        with trainer.binding.adapter_off():
            off = trainer.unet(**inputs).sample
        with trainer.binding.user(kv, 1.0):
            on = trainer.unet(**inputs).sample
    assert torch.equal(pred[dropped], off[dropped])
    assert torch.equal(pred[~dropped], on[~dropped]) and not torch.equal(on[dropped], off[dropped])
    stats = trainer._loss(inputs, users, weights, eps, backward_scale=1.0)
    assert torch.all(stats.margins[dropped[:8]] == 0) and torch.any(stats.margins[~dropped[:8]] != 0)


def test_dropout_share(tmp_path, world_data):
    trainer = _trainer(tmp_path, world_data)
    g = torch.Generator().manual_seed(0)
    share = torch.stack([trainer._inputs(trainer.train, torch.arange(16), g, dropout=0.3)[2][:16] == 0
                         for _ in range(200)]).float().mean().item()
    assert abs(share - 0.3) < 0.03
    assert (trainer._inputs(trainer.train, torch.arange(16), g, dropout=0.0)[2] == 1).all()


def test_tensorboard_shows_both_validation_curves(tmp_path, world_data):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _trainer(tmp_path, world_data, max_steps=4, tensorboard=True).run()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"val_users_implicit_acc", "val_users_loss", "val_pairs_implicit_acc", "val_pairs_loss", "loss"} <= tags
    assert [e.step for e in events.Scalars("val_users_implicit_acc")] == [2, 4]
