"""Trainer invariants checked on values: the reference is the adapter-off model, each pair trains with its own user's
embedding, the warm-up survives a resume, keep-last-K keeps the newest checkpoints."""

from __future__ import annotations

import json
import math
import re
import warnings

import pytest
import torch

from ppd_train.checkpoint import find_latest, prune_checkpoints
from ppd_train.errors import PPDError
from ppd_train.synthetic import World, WorldConfig, build_dataset
from ppd_train.tiny import build_tiny_stage_c
from ppd_train.train import TrainConfig, Trainer

WORLD = WorldConfig(seen_users=4, unseen_users=1, unseen_mixtures=0, pairs_per_user=6, embedding_views=2)


@pytest.fixture(scope="module")
def world_data():
    data, embeddings, views = build_dataset(World(WORLD, seed=0), seed=0)
    return data, views, embeddings["seen00"].embedder


def _trainer(tmp_path, world_data, **kw) -> Trainer:
    data, views, embedder = world_data
    cfg = dict(out_dir=str(tmp_path / "run"), max_steps=6, batch_size=4, lr=1e-2, beta=100.0, checkpoint_every=2,
               keep_checkpoints=2, val_fraction=0.0, log_every=1, tensorboard=False, user_dropout=0.0)
    cfg.update(kw)
    return Trainer(TrainConfig(**cfg), build_tiny_stage_c(seed=0), data, views, embedder, show_progress=False)


def _record_unet_calls(trainer: Trainer) -> list[tuple[bool, dict, torch.Tensor]]:
    """Every Stage C forward the trainer makes: (gradients on?, inputs, output)."""
    calls: list[tuple[bool, dict, torch.Tensor]] = []

    def hook(module, args, kwargs, output):
        calls.append((torch.is_grad_enabled(), {k: v.detach().clone() for k, v in kwargs.items()},
                      output.sample.detach().clone()))

    trainer.unet.register_forward_hook(hook, with_kwargs=True)
    return calls


def test_reference_is_the_base_model_and_the_loss_leaves_ln2(tmp_path, world_data):
    """A fresh adapter adds nothing, so step 1 sits exactly at ln 2; the reference pass (no gradients) must stay the
    base model while the adapter trains, so the loss moves off ln 2 within a few steps."""
    trainer = _trainer(tmp_path, world_data)
    calls = _record_unet_calls(trainer)
    steps = [trainer.train_step() for _ in range(5)]
    assert math.isclose(steps[0]["loss"], math.log(2), rel_tol=1e-6)
    assert steps[0]["model_mse"] == pytest.approx(steps[0]["ref_mse"], rel=1e-6)
    assert abs(steps[-1]["loss"] - math.log(2)) > 1e-3 and steps[-1]["model_mse"] != steps[-1]["ref_mse"]
    base = build_tiny_stage_c(seed=0).eval()
    refs = [(inputs, out) for grad, inputs, out in calls if not grad]
    assert len(refs) == 5 and len(calls) == 10  # one reference and one policy pass per step
    with torch.no_grad():
        for inputs, out in refs:
            torch.testing.assert_close(out, base(**inputs).sample, rtol=0, atol=1e-6)
    # the policy pass does see the trained adapter
    last_policy_inputs, last_policy = [(i, o) for g, i, o in calls if g][-1]
    with torch.no_grad():
        assert (last_policy - base(**last_policy_inputs).sample).abs().max() > 1e-4


def test_each_pair_is_trained_with_its_own_users_embedding(tmp_path, world_data):
    """Noise at t ~ 0 leaves each row's preferred latent recognisable: the user tokens of that row must be one of the
    embeddings ("views") of the user who made that pair, the same for both images of the pair."""
    data, views, _ = world_data
    trainer = _trainer(tmp_path, world_data, t_min=0.0, t_max=1e-6, batch_size=8)
    tokens_seen: list[torch.Tensor] = []
    adapter = trainer.acc.unwrap_model(trainer.adapter)
    adapter.register_forward_pre_hook(lambda module, args: tokens_seen.append(args[0].detach().clone()))
    calls = _record_unet_calls(trainer)
    used_views = set()
    for _ in range(3):
        trainer.train_step()
    samples = [inputs["sample"] for grad, inputs, _ in calls if grad]
    assert len(samples) == len(tokens_seen) == 3
    flat_w = data.latents_w.flatten(1)
    for sample, tokens in zip(samples, tokens_seen):
        b = sample.shape[0] // 2
        assert torch.equal(tokens[:b], tokens[b:])  # preferred and dispreferred image: the same user
        for row in range(b):
            pair = int((flat_w - sample[row].flatten()).norm(dim=1).argmin())
            user = int(data.user_idx[pair])
            match = [v for v in range(views.shape[1]) if torch.equal(tokens[row], views[user, v].float())]
            assert match, f"row {row}: pair {pair} of user {user} got another user's embedding"
            used_views.update(match)
    assert used_views == set(range(views.shape[1]))  # every view of a user is drawn


def _lrs(log_path) -> dict[int, float]:
    lrs = {}
    for line in log_path.read_text().splitlines():
        entry = json.loads(line)
        if "lr" in entry:
            lrs[entry["step"]] = entry["lr"]  # a resumed run logs again from its checkpoint: the last entry counts
    return lrs


def test_warmup_continues_across_a_resume(tmp_path, world_data):
    kw = dict(warmup_steps=4, max_steps=6, checkpoint_every=2)
    straight = _trainer(tmp_path / "a", world_data, **kw)
    straight.run()

    def kill(step):
        if step == 3:
            raise KeyboardInterrupt  # the newest checkpoint is step 2, in the middle of the warm-up

    with pytest.raises(KeyboardInterrupt):
        _trainer(tmp_path / "b", world_data, **kw).run(on_step=kill)
    resumed = _trainer(tmp_path / "b", world_data, **kw)
    resumed.run()
    expected = _lrs(tmp_path / "a" / "run" / "train_log.jsonl")
    assert sorted(expected) == list(range(1, 7)) and expected[1] < expected[2] < expected[3] == expected[6]  # warm-up
    assert _lrs(tmp_path / "b" / "run" / "train_log.jsonl") == expected
    for (name, a), b in zip(straight.adapter.state_dict().items(), resumed.adapter.state_dict().values()):
        assert torch.equal(a, b), name
    assert resumed.optimizer.param_groups[0]["lr"] == straight.optimizer.param_groups[0]["lr"]


def test_keep_last_k_keeps_the_newest(tmp_path, world_data):
    _trainer(tmp_path, world_data, max_steps=5, checkpoint_every=1, keep_checkpoints=2).run()
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*")) == ["step-00000004.safetensors", "step-00000005.safetensors"]
    assert find_latest(folder).name == "step-00000005.safetensors"


def test_prune_orders_steps_as_numbers_and_ignores_temporaries(tmp_path):
    for step in (1, 9, 10, 11, 100):
        (tmp_path / f"step-{step:08d}.safetensors").write_bytes(b"x")
    (tmp_path / ".step-00000200.safetensors.123.tmp").write_bytes(b"partial")
    assert find_latest(tmp_path).name == "step-00000100.safetensors"
    prune_checkpoints(tmp_path, 3)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == [f"step-{s:08d}.safetensors" for s in (10, 11, 100)]
    prune_checkpoints(tmp_path, 1)
    assert [p.name for p in tmp_path.glob("step-*")] == ["step-00000100.safetensors"]
    assert find_latest(tmp_path / "missing") is None


def test_both_images_of_a_pair_share_noise_timestep_and_caption(tmp_path, world_data):
    """The DPO comparison is only fair with the same noise and timestep for x+ and x-: recover the noise from each
    half of the Stage C batch and compare; the timesteps stay inside [t_min, t_max]; each row gets its pair's caption;
    the loss the trainer reports is the DPO loss of exactly these predictions."""
    from ppd_train.loss import dpo_loss
    from ppd_train.schedule import alpha_bar

    data, _, _ = world_data
    trainer = _trainer(tmp_path, world_data, t_min=0.3, t_max=0.6, batch_size=6)
    calls = _record_unet_calls(trainer)
    reported = [trainer.train_step() for _ in range(3)]
    flat_w, flat_l = data.latents_w.flatten(1), data.latents_l.flatten(1)
    for step in range(3):
        (_, ref_in, ref), (_, inputs, pred) = calls[2 * step], calls[2 * step + 1]
        assert all(torch.equal(ref_in[k], inputs[k]) for k in inputs)  # reference and policy see the same batch
        t, x = inputs["timestep_ratio"], inputs["sample"]
        b2 = x.shape[0]  # no image prompt: a zero CLIP image embedding per row, as at inference
        assert inputs["clip_img"].shape[0] == b2 and not inputs["clip_img"].any()
        b = len(t) // 2
        assert torch.equal(t[:b], t[b:]) and bool(((t >= 0.3) & (t <= 0.6)).all()) and len(set(t[:b].tolist())) > 1
        ab = alpha_bar(t).view(-1, 1, 1, 1)
        noises = []
        for row in range(b):
            # the pair whose preferred and dispreferred latents leave the same noise behind
            scores = []
            for pair in range(len(data)):
                eps_w = (x[row] - ab[row].sqrt() * data.latents_w[pair]) / (1 - ab[row]).sqrt()
                eps_l = (x[b + row] - ab[row].sqrt() * data.latents_l[pair]) / (1 - ab[row]).sqrt()
                scores.append(float((eps_w - eps_l).abs().max()))
            pair = min(range(len(data)), key=scores.__getitem__)
            assert scores[pair] < 1e-4, f"row {row}: no pair leaves the same noise in both images"
            noises.append((x[row] - ab[row].sqrt() * data.latents_w[pair]) / (1 - ab[row]).sqrt())
            caption = int(data.caption_idx[pair])
            for r in (row, b + row):
                assert torch.equal(inputs["clip_text"][r], data.text[caption])
                assert torch.equal(inputs["clip_text_pooled"][r], data.pooled[caption])
            assert float((flat_w[pair] - flat_l[pair]).abs().max()) > 0
        eps = torch.stack(noises)
        stats = dpo_loss(pred[:b], pred[b:], ref[:b], ref[b:], eps, trainer.cfg.beta)
        assert reported[step]["loss"] == pytest.approx(float(stats.loss), rel=1e-4, abs=1e-6)
        assert reported[step]["implicit_acc"] == pytest.approx(stats.implicit_acc)
        assert reported[step]["ref_mse"] == pytest.approx(stats.ref_mse, rel=1e-4)
        assert reported[step]["model_mse"] == pytest.approx(stats.model_mse, rel=1e-4)
    assert abs(reported[-1]["loss"] - math.log(2)) > 1e-4  # a step where w and l swapped would give another value
    assert not any(p.grad is not None for p in trainer.unet.parameters())  # Stage C stays frozen


def test_logging_and_checkpoint_cadence(tmp_path, world_data):
    trainer = _trainer(tmp_path, world_data, max_steps=5, log_every=3, checkpoint_every=2, keep_checkpoints=10,
                       tensorboard=True)
    seen = []
    trainer.run(on_step=seen.append)
    assert seen == [1, 2, 3, 4, 5]
    log = [json.loads(line) for line in (tmp_path / "run" / "train_log.jsonl").read_text().splitlines()]
    log = [e for e in log if "pairs_per_s" in e]  # the training-step lines
    assert [e["step"] for e in log] == [3, 5]  # every log_every steps, and the last one
    assert all(e["pairs_per_s"] > 0 and e["skipped"] == 0.0 and e["lr"] == 1e-2 for e in log)
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.glob("step-*")) == [f"step-{s:08d}.safetensors" for s in (2, 4, 5)]
    from ppd_train.adapter import read_adapter_config

    summary = read_adapter_config(tmp_path / "run" / "adapter.safetensors")[0].training
    assert summary["final_loss"] == log[-1]["loss"] and summary["steps"] == 5 and summary["lr"] == 1e-2
    assert (summary["pairs"], summary["users"], summary["batch_pairs"], summary["user_dropout"]) == (
        len(trainer.train), 4, 4, 0.0)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert [e.step for e in events.Scalars("loss")] == [3, 5]
    assert events.Scalars("loss")[-1].value == pytest.approx(log[-1]["loss"])


def test_learning_rate_without_warmup_and_gradient_clipping(tmp_path, world_data):
    trainer = _trainer(tmp_path / "a", world_data, warmup_steps=0)
    assert [trainer.train_step()["lr"] for _ in range(2)] == [1e-2, 1e-2]  # full rate from the first step

    def trained(**kw):
        t = _trainer(tmp_path / str(len(kw)) / str(kw), world_data, **kw)
        for _ in range(3):
            t.train_step()
        return torch.cat([p.detach().flatten() for p in t.adapter.parameters()])

    fresh = torch.cat([p.detach().flatten() for p in _trainer(tmp_path / "f", world_data).adapter.parameters()])
    free, tight = trained(max_grad_norm=0.0), trained(max_grad_norm=1e-6)
    assert not torch.equal(free, fresh)  # max_grad_norm = 0 means no clipping, not a zero gradient
    assert not torch.equal(free, tight)


def test_resume_refuses_other_data_unless_forced(tmp_path, world_data):
    _trainer(tmp_path, world_data, max_steps=2).run()
    data, views, embedder = world_data
    other = data.subset(torch.arange(len(data) - 1))
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=3, batch_size=4, lr=1e-2, beta=100.0,
                      checkpoint_every=2, keep_checkpoints=2, val_fraction=0.0, log_every=1, tensorboard=False,
                      user_dropout=0.0)
    with pytest.raises(PPDError, match="was trained on other data"):
        Trainer(cfg, build_tiny_stage_c(seed=0), other, views, embedder, show_progress=False).run()
    forced = Trainer(cfg, build_tiny_stage_c(seed=0), other, views, embedder, show_progress=False)
    assert forced.resume(force=True) and forced.step == 2
    changed = Trainer(TrainConfig(**{**cfg.__dict__, "log_every": 2, "checkpoint_every": 3}),
                      build_tiny_stage_c(seed=0), data, views, embedder, show_progress=False)
    assert changed.resume() and changed.step == 2  # logging and checkpoint cadence may change freely
    with pytest.raises(PPDError, match="changed: seed"):
        Trainer(TrainConfig(**{**cfg.__dict__, "seed": 1}), build_tiny_stage_c(seed=0), data, views, embedder,
                show_progress=False).resume()
    with pytest.raises(PPDError, match="3 user embeddings for 4 users"):
        Trainer(cfg, build_tiny_stage_c(seed=0), data, views[:3], embedder, show_progress=False)


def test_a_non_finite_step_is_reported_as_skipped(tmp_path, world_data):
    trainer = _trainer(tmp_path, world_data)
    trainer.cfg.beta = float("inf")  # validate() refuses it: poison the loss after the checks
    before = [p.detach().clone() for p in trainer.adapter.parameters()]
    assert trainer.train_step()["skipped"] == 1.0 and trainer.step == 1
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.adapter.parameters()))


T_RANGE = "need 0 <= t_min < t_max <= 1"


@pytest.mark.parametrize("change, key", [
    (dict(max_steps=-1), "max_steps"), (dict(max_epochs=-1.0), "max_epochs"), (dict(max_epochs=math.inf), "max_epochs"),
    (dict(batch_size=0), "batch_size"), (dict(grad_accum=0), "grad_accum"), (dict(lr=0.0), "lr"),
    (dict(lr=1.5), "lr"), (dict(beta=0.0), "beta"), (dict(weight_decay=math.inf), "weight_decay"),
    (dict(max_grad_norm=math.inf), "max_grad_norm"), (dict(warmup_steps=-1), "warmup_steps"),
    (dict(max_nan_steps=0), "max_nan_steps"), (dict(user_dropout=1.0), "user_dropout"),
    (dict(user_dropout=-0.1), "user_dropout"), (dict(t_min=0.5, t_max=0.5), T_RANGE), (dict(t_max=1.5), T_RANGE),
    (dict(t_min=-0.1), T_RANGE), (dict(val_fraction=1.0), "val_fraction"),
    (dict(heldout_users=1.0), "heldout_users"), (dict(mixed_precision="fp8"), "mixed_precision"),
    (dict(keep_checkpoints=0), "keep_checkpoints"), (dict(stage_c_dtype="fp16"), "stage_c_dtype"),
    (dict(stage_c_dtype="bf16"), "stage_c_dtype = bf16 needs"), (dict(proj_dim=-1), "proj_dim"),
    (dict(log_every=0), "log_every"), (dict(checkpoint_every=0), "checkpoint_every"), (dict(val_every=-1), "val_every"),
    (dict(patience=-1), "patience"), (dict(val_draws=0), "val_draws"), (dict(select_after=1.0), "select_after"),
    (dict(token_noise=math.inf), "token_noise"), (dict(token_noise=-0.1), "token_noise"),
    (dict(select_metric="best"), "select_metric must be one of val_users_implicit_acc, "),
    (dict(lr_schedule="linear"), "lr_schedule"), (dict(optimizer="sgd"), "optimizer must be adamw or adamw8bit")])
def test_config_limits(change, key):
    """Each refused value names its key, so the message says what to fix."""
    with pytest.raises(PPDError, match=r"Config: (need )?[^.]*" + re.escape(key)) as refused:
        TrainConfig(**change).validate()
    assert str(refused.value).startswith(f"Config: {key}")


def test_config_edges_that_are_allowed():
    for ok in (dict(max_steps=1, batch_size=1, grad_accum=1, keep_checkpoints=1, max_nan_steps=1),
               dict(user_dropout=0.0), dict(lr=1.0, beta=0.5, max_epochs=0.0, weight_decay=0.0, max_grad_norm=0.0),
               dict(t_min=0.0, t_max=1.0), dict(val_fraction=0.0), dict(mixed_precision="fp16"),
               dict(lr_schedule="constant"), dict(lr_schedule="cosine"),
               dict(select_after=0.0, val_every=0, patience=0, val_draws=1, token_noise=0.0, proj_dim=0),
               dict(mixed_precision="bf16", stage_c_dtype="bf16"),
               dict(mixed_precision="bf16", stage_c_dtype="float32")):
        TrainConfig(**ok).validate()
    dtypes = {(mp, sd): TrainConfig(mixed_precision=mp, stage_c_dtype=sd).frozen_dtype()
              for mp, sd in (("bf16", "bf16"), ("bf16", "auto"), ("bf16", "float32"), ("no", "auto"))}
    assert dtypes == {("bf16", "bf16"): torch.bfloat16, ("bf16", "auto"): torch.bfloat16,
                      ("bf16", "float32"): torch.float32, ("no", "auto"): torch.float32}


def test_one_training_pair_is_enough(tmp_path, world_data):
    data, views, embedder = world_data
    two = data.subset(torch.nonzero(data.user_idx == 0).flatten()[:2])
    cfg = TrainConfig(out_dir=str(tmp_path / "run"), max_steps=1, batch_size=1, val_fraction=0.5, heldout_users=0.0,
                      tensorboard=False)
    trainer = Trainer(cfg, build_tiny_stage_c(seed=0), two, views, embedder, show_progress=False)
    assert len(trainer.train) == 1 and len(trainer.val_pairs) == 1


def _spy(monkeypatch, owner, name: str) -> list[tuple[tuple, object]]:
    """Record each call of one method of an object (the trainer, its accelerator): (arguments, result). It still
    runs."""
    calls: list[tuple[tuple, object]] = []
    real = getattr(owner, name)

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(((*args, *kwargs.values()), out))
        return out

    monkeypatch.setattr(owner, name, spy)
    return calls


def test_an_accumulated_step_is_the_mean_of_its_micro_batches(tmp_path, world_data, monkeypatch):
    """grad_accum = 2: the gradient the optimizer gets, and the logged loss, are the means over the two micro-batches,
    each computed here on its own by an untouched twin of the adapter."""
    kw = dict(batch_size=2, grad_accum=2, max_grad_norm=0.0)
    trainer, twin = _trainer(tmp_path / "a", world_data, **kw), _trainer(tmp_path / "b", world_data, **kw)
    grads: dict[str, torch.Tensor] = {}
    trainer.optimizer.optimizer.register_step_pre_hook(lambda *_: grads.update(
        {n: p.grad.clone() for n, p in trainer.adapter.named_parameters()}))
    micro = _spy(monkeypatch, trainer, "_loss")
    warn_always = torch.is_warn_always_enabled()
    torch.set_warn_always(True)  # torch warns once per process: an earlier test must not use up this warning
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            totals = trainer.train_step()
    finally:
        torch.set_warn_always(warn_always)
    assert [str(w.message) for w in caught] == []  # e.g. no float() of a tensor that needs grad
    assert len(micro) == 2
    losses = []
    for (inputs, users, weights, eps, _), _ in micro:
        stats = twin._loss(inputs, users, weights, eps, backward_scale=None)
        (stats.loss / 2).backward()
        losses.append(float(stats.loss.detach()))
    for name, p in twin.adapter.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-9)
    assert totals["loss"] == pytest.approx(sum(losses) / 2, rel=1e-6)
    assert totals["loss"] == pytest.approx(sum(float(stats.loss.detach()) for _, stats in micro) / 2, rel=1e-6)


def test_every_training_pair_is_drawn_once_per_epoch(tmp_path, world_data, monkeypatch):
    trainer = _trainer(tmp_path, world_data, batch_size=3, grad_accum=2)
    calls = _spy(monkeypatch, trainer, "_inputs")
    n = len(trainer.train)
    per_epoch = n // 6
    assert n % 6 == 0 and per_epoch >= 2
    for _ in range(2 * per_epoch):
        trainer.train_step()
    drawn = torch.cat([args[1] for args, _ in calls])
    assert sorted(drawn[:n].tolist()) == sorted(drawn[n:].tolist()) == list(range(n))
    assert not torch.equal(drawn[:n], drawn[n:])  # each epoch in its own order
    assert trainer.cursor == 2 * n


@pytest.mark.parametrize("dropout, noise", [(0.5, 0.0), (0.0, 0.2)])
def test_the_configured_dropout_and_token_noise_reach_the_training_pairs(tmp_path, world_data, monkeypatch,
                                                                         dropout, noise):
    data, views, _ = world_data
    trainer = _trainer(tmp_path, world_data, user_dropout=dropout, token_noise=noise, batch_size=8)
    calls = _spy(monkeypatch, trainer, "_inputs")
    for _ in range(3):
        trainer.train_step()
    weights = torch.cat([out[2] for _, out in calls])
    users = torch.cat([out[1] for _, out in calls])
    table = views.float().flatten(0, 1)  # every view of every user
    exact = torch.tensor([any(torch.equal(row, v) for v in table) for row in users])
    assert bool((weights == 0).any()) == (dropout > 0) and bool((weights == 1).any())
    assert bool(exact.all()) == (noise == 0) and not bool(exact.any()) == (noise > 0)


def test_a_non_finite_micro_batch_skips_the_whole_step(tmp_path, world_data, monkeypatch):
    """With grad_accum = 2, a NaN in the first micro-batch skips the step even though the second one is finite: the
    optimizer never steps on half a batch."""
    trainer = _trainer(tmp_path, world_data, batch_size=2, grad_accum=2)
    real = trainer._inputs
    seen = []

    def poison_first(*args, **kwargs):
        both, users, weights, eps = real(*args, **kwargs)
        seen.append(1)
        if len(seen) == 1:
            both = {**both, "sample": torch.full_like(both["sample"], float("nan"))}
        return both, users, weights, eps

    monkeypatch.setattr(trainer, "_inputs", poison_first)
    backward = _spy(monkeypatch, trainer.acc, "backward")
    before = [p.detach().clone() for p in trainer.adapter.parameters()]
    assert trainer.train_step()["skipped"] == 1.0 and trainer.nan_run == 1 and len(seen) == 2
    assert len(backward) == 2  # the NaN one too (with a zero gradient): under DDP every process must run backward
    assert all(torch.equal(a, p) for a, p in zip(before, trainer.adapter.parameters()))


def test_the_loss_runs_each_pair_at_its_weight(tmp_path, world_data):
    """Weights of 1 are the full user (the DPO margins of the user-on against the adapter-off predictions); a batch
    in which every pair is dropped runs with the adapter off: margins 0, loss ln 2."""
    from ppd_train.loss import dpo_loss

    trainer = _trainer(tmp_path, world_data, lr=5e-2)
    for _ in range(3):  # a trained adapter, so "on" differs from "off"
        trainer.train_step()
    g = torch.Generator().manual_seed(5)
    inputs, users, weights, eps = trainer._inputs(trainer.train, torch.arange(4), g, dropout=0.0)
    assert bool((weights == 1).all())
    with torch.no_grad():
        with trainer.binding.user(trainer.adapter(users), 1.0):
            on = trainer.unet(**inputs).sample
        with trainer.binding.adapter_off():
            off = trainer.unet(**inputs).sample
        expected = dpo_loss(on[:4], on[4:], off[:4], off[4:], eps, trainer.cfg.beta).margins
        full = trainer._loss(inputs, users, weights, eps, backward_scale=None)
        dropped = trainer._loss(inputs, users, torch.zeros_like(weights), eps, backward_scale=None)
    assert expected.abs().min() > 0
    torch.testing.assert_close(full.margins, expected, rtol=1e-5, atol=1e-7)
    assert torch.all(dropped.margins == 0) and math.isclose(float(dropped.loss), math.log(2), rel_tol=1e-6)


def test_a_step_whose_every_pair_is_dropped_trains_on_with_a_zero_gradient(tmp_path, world_data, monkeypatch):
    """user_dropout can drop every pair of a micro-batch (likely with small batches): its loss is the constant ln 2,
    the adapter is off for all rows, and the step goes on with a zero gradient instead of failing in backward."""
    trainer = _trainer(tmp_path, world_data, batch_size=2, user_dropout=0.5)
    real = trainer._inputs

    def drop_all(*args, **kwargs):
        both, users, weights, eps = real(*args, **kwargs)
        return both, users, torch.zeros_like(weights), eps

    monkeypatch.setattr(trainer, "_inputs", drop_all)
    grads: list[torch.Tensor] = []
    trainer.optimizer.optimizer.register_step_pre_hook(lambda *_: grads.extend(
        p.grad.clone() for p in trainer.adapter.parameters()))
    values = trainer.train_step()
    assert values["skipped"] == 0.0 and math.isclose(values["loss"], math.log(2), rel_tol=1e-6)
    assert grads and all(bool((g == 0).all()) for g in grads)


@pytest.mark.parametrize("schedule, max_steps, warmup, expected", [
    ("cosine", 11, 3, {0: 1 / 3, 1: 2 / 3, 2: 1.0, 3: 1.0, 5: 0.5 * (1 + math.cos(math.pi / 4)), 7: 0.5, 11: 0.0}),
    ("cosine", 4, 0, {0: 1.0, 2: 0.5, 4: 0.0}),
    ("cosine", 4, 3, {2: 1.0, 3: 1.0, 4: 0.0}),  # one step of decay
    ("constant", 4, 0, {0: 1.0, 4: 1.0}),
    ("constant", 8, 4, {0: 0.25, 3: 1.0, 8: 1.0}),
])
def test_learning_rate_schedule_values(tmp_path, world_data, schedule, max_steps, warmup, expected):
    """Linear warm-up to the full rate, then constant or a cosine that reaches 0 at the end of the budget."""
    trainer = _trainer(tmp_path, world_data, lr_schedule=schedule, max_steps=max_steps, warmup_steps=warmup)
    assert {s: trainer.lr_factor(s) for s in expected} == pytest.approx(expected, abs=1e-12)


def test_the_split_is_a_function_of_the_seed_only(tmp_path, world_data):
    """Runs that differ in the adapter or the recipe validate on the same pairs (so a sweep compares like with like);
    another seed is another split."""
    def split(**kw):
        t = _trainer(tmp_path / str(len(kw)) / str(sorted(kw.items())), world_data, val_fraction=0.25, **kw)
        return t.train.latents_w, t.val_pairs.latents_w

    base = split()
    for kw in (dict(proj_dim=16), dict(lr=1e-3, beta=10.0)):
        assert all(torch.equal(a, b) for a, b in zip(base, split(**kw)))
    assert not torch.equal(base[1], split(seed=1)[1])


def test_a_steps_draws_come_from_its_own_generator(tmp_path, world_data):
    """Timesteps, noise, dropout and token noise of a batch depend only on its generator, never on torch's global
    random state (so a resumed run draws what the straight run drew)."""
    trainer = _trainer(tmp_path, world_data)

    def draw(global_seed):
        torch.manual_seed(global_seed)
        return trainer._inputs(trainer.train, torch.arange(8), torch.Generator().manual_seed(3), 0.5, 0.2)

    (a_in, *a), (b_in, *b) = draw(0), draw(1)
    assert all(torch.equal(a_in[k], b_in[k]) for k in a_in) and all(torch.equal(x, y) for x, y in zip(a, b))


def test_token_noise_is_relative_to_each_tokens_own_scale(tmp_path, world_data):
    """token_noise = s adds Gaussian noise of s times each token's standard deviation: tokens of every scale get the
    same relative noise (embedding tables of real VLMs differ in scale by user and by token)."""
    data, views, embedder = world_data
    t_count = views.shape[-2]
    scale = torch.arange(1, views.shape[0] + 1).view(-1, 1, 1, 1) * torch.arange(1, t_count + 1).view(1, 1, -1, 1)
    trainer = Trainer(TrainConfig(out_dir=str(tmp_path / "run"), max_steps=6, batch_size=4, val_fraction=0.0,
                                  tensorboard=False), build_tiny_stage_c(seed=0), data, views.float() * scale,
                      embedder, show_progress=False)
    idx = torch.arange(len(trainer.train))
    g = torch.Generator().manual_seed(0)
    clean = trainer._inputs(trainer.train, idx, torch.Generator().manual_seed(0), 0.0, 0.0)[1]
    noised = trainer._inputs(trainer.train, idx, g, 0.0, 0.2)[1]
    ratio = (noised - clean).std(dim=-1) / clean.std(dim=-1)  # [2B, T]
    assert ratio.mean(0).tolist() == pytest.approx([0.2] * t_count, rel=0.15)  # at every token position
    assert ratio.mean(1).min() > 0.1 and ratio.mean(1).max() < 0.3  # and for every user


def test_validation_uses_each_users_exact_embedding(tmp_path, world_data, monkeypatch):
    data, views, _ = world_data
    trainer = _trainer(tmp_path, world_data, val_fraction=0.25, user_dropout=0.5, token_noise=0.2)
    calls = _spy(monkeypatch, trainer, "_inputs")
    trainer.validate()
    assert calls
    table = views.float().flatten(0, 1)
    for _, (_, users, weights, _) in calls:
        assert bool((weights == 1).all())
        assert all(any(torch.equal(row, v) for v in table) for row in users)


def test_a_good_step_ends_a_run_of_skipped_ones(tmp_path, world_data):
    trainer = _trainer(tmp_path, world_data)
    trainer.cfg.beta = float("inf")  # validate() refuses it: poison the loss after the checks
    trainer.train_step()
    assert trainer.nan_run == 1
    trainer.cfg.beta = 100.0
    assert trainer.train_step()["skipped"] == 0.0 and trainer.nan_run == 0
