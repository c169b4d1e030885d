"""Trainer invariants checked on values: the reference is the adapter-off model, each pair trains with its own user's
embedding, the warm-up survives a resume, keep-last-K keeps the newest checkpoints."""

from __future__ import annotations

import json
import math

import pytest
import torch

from ppd_train.checkpoint import find_latest, prune_checkpoints
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
    assert sorted(p.name for p in folder.iterdir()) == ["step-00000004.safetensors", "step-00000005.safetensors"]
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
