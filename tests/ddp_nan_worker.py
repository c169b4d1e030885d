"""Run by ``tests/test_cli_train.py`` under torchrun (two CPU processes, gloo): three of ``fit``'s steps with a NaN
in process 1's first batch. Each process writes, as JSON to ``rank<r>.json`` in the folder named by argv[1], what
both saw: the steps each skipped, how far their adapters are apart and whether training moved its own. Then it leaves
cleanly: a barrier and the process group destroyed (without that, gloo's threads could abort the process at
interpreter exit, "terminate called without an active exception", pytorch/pytorch#190489)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ppd_train.synthetic import World, WorldConfig, build_dataset
from ppd_train.tiny import build_tiny_stage_c
from ppd_train.train import TrainConfig, Trainer


def main(folder: Path) -> None:
    world = WorldConfig(seen_users=4, unseen_users=1, unseen_mixtures=0, pairs_per_user=6, embedding_views=2)
    data, embeddings, views = build_dataset(World(world, seed=0), seed=0)
    cfg = TrainConfig(out_dir=str(folder / "run"), max_steps=3, batch_size=2, lr=1e-2, beta=100.0,
                      val_fraction=0.0, tensorboard=False, user_dropout=0.0)
    trainer = Trainer(cfg, build_tiny_stage_c(seed=0), data, views, embeddings["seen00"].embedder,
                      show_progress=False)
    real = trainer._inputs

    def nan_in_rank_1s_first_batch(*args, **kwargs):
        inputs, users, weights, eps = real(*args, **kwargs)
        if trainer.step == 0 and trainer.acc.process_index == 1:
            inputs = {**inputs, "sample": torch.full_like(inputs["sample"], float("nan"))}
        return inputs, users, weights, eps

    trainer._inputs = nan_in_rank_1s_first_batch  # type: ignore[method-assign]

    def flat() -> torch.Tensor:
        return torch.cat([p.detach().flatten() for p in trainer.adapter.parameters()])

    start = flat()
    skipped = [trainer.train_step()["skipped"] for _ in range(3)]
    mine = flat()
    params = [torch.empty_like(mine) for _ in range(2)]
    dist.all_gather(params, mine)
    everyone: list = [None, None]
    dist.all_gather_object(everyone, skipped)
    rank = trainer.acc.process_index
    (folder / f"rank{rank}.json").write_text(json.dumps({
        "rank": rank, "skipped": everyone, "apart": float((params[0] - params[1]).abs().max()),
        "moved": float((mine - start).abs().max())}))
    trainer.detach()
    dist.barrier()
    trainer.acc.end_training()  # destroys the process group


if __name__ == "__main__":
    main(Path(sys.argv[1]))
