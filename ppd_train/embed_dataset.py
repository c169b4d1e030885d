"""``ppd-train embed``: embed every user of a dataset into one table file, resumable after a kill.

Users are processed in a fixed order, a batch at a time; each finished batch is written atomically as a part file
next to the output. A rerun skips users already in parts, so a killed run loses at most one batch. When all users are
done the parts are merged into the table and removed. Under ``accelerate launch`` every process embeds its own slice.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Protocol

from tqdm.auto import tqdm

from .embedding import UserEmbedding, load_embedding_table, save_embedding_table
from .errors import PPDError
from .pairs import PairError, PreferencePair, content_hash, select_pairs
from .safetensors_io import atomic_save_safetensors, dumps_json, read_json_metadata, read_safetensors

PART_KEY = "ppd_embedding_part"


class Embedder(Protocol):
    id: str

    def embed(self, users, user_ids=None, progress=None) -> list[UserEmbedding]: ...


def _parts_dir(out: Path) -> Path:
    return out.with_name(out.name + ".parts")


def _read_parts(parts: Path, settings: dict, digests: dict[str, str]) -> tuple[dict[str, UserEmbedding], int]:
    """The embeddings already in ``parts`` made from exactly the pairs now chosen for their user (``digests``: user ->
    content hash of those pairs), and how many others are there: users of another dataset run with the same
    ``--out``, or whose chosen pairs changed. Those are never reused."""
    done: dict[str, UserEmbedding] = {}
    stale = 0
    for part in sorted(parts.glob("part-*.safetensors")):
        tensors, metadata = read_safetensors(part, "embedding part")
        meta = read_json_metadata(metadata, PART_KEY, part, "embedding part")
        if meta.get("settings") != settings:
            raise PPDError(f"{parts} holds an unfinished run with other settings ({meta.get('settings')}); finish it "
                           f"with those settings, or delete {parts} to start over with {settings}.")
        made_from = meta.get("pairs") or [None] * len(meta["users"])  # parts written before the key: never reused
        for i, (umeta, digest) in enumerate(zip(meta["users"], made_from)):
            uid = umeta["user_id"]
            if digests.get(uid) != digest:
                stale += 1
                continue
            emb = UserEmbedding(tensors[f"u{i}"], settings["embedder"], umeta)
            shape = next(iter(done.values())).tokens.shape if done else emb.tokens.shape
            if emb.tokens.shape != shape:
                raise PPDError(f"{part}: user {uid}'s embedding is {tuple(emb.tokens.shape)} tokens x width, the "
                               f"others' {tuple(shape)}: the embedder changed shape within one run. Delete {parts} "
                               "and embed again.")
            done[uid] = emb
    return done, stale


def embed_users(users: dict[str, list[PreferencePair]], embedder: Embedder, out: str | os.PathLike, n_pairs: int = 4,
                select: str = "random", seed: int = 0, batch_users: int = 8, accelerator=None,
                show_progress: bool = True, progress=None) -> dict[str, UserEmbedding]:
    """Embed each user from ``n_pairs`` of their pairs (recorded in the embedding's ``pair_sources`` so training can
    leave them out). Users with too few pairs are skipped and reported. Returns the merged table."""
    out = Path(out)
    parts = _parts_dir(out)
    settings = {"embedder": embedder.id, "n_pairs": n_pairs, "select": select, "seed": seed}
    chosen: dict[str, list[PreferencePair]] = {}
    skipped, unreadable = [], {}
    for uid in sorted(users):
        try:
            picked = select_pairs(users[uid], n_pairs, select, seed, who=f"user {uid}")
        except PairError:
            skipped.append(uid)
            continue
        try:  # decode now: one bad image skips its user instead of stopping the batch (and the run) it falls in
            for pair in picked:
                pair.chosen.load()
                pair.rejected.load()
        except PairError as e:
            unreadable[uid] = str(e)
            continue
        chosen[uid] = picked
    if unreadable:
        print(f"note: {len(unreadable)} user(s) skipped because an image of theirs cannot be read: "
              + "; ".join(f"user {u}: {msg}" for u, msg in list(unreadable.items())[:10])
              + (" ..." if len(unreadable) > 10 else ""))
    if not chosen:
        raise PPDError(f"No user has {n_pairs} usable pairs ({len(users)} users read"
                       f"{f', {len(unreadable)} with unreadable images' if unreadable else ''}). Lower --n-pairs or "
                       "add data.")
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    parts.mkdir(parents=True, exist_ok=True)
    digests = {u: content_hash(pairs) for u, pairs in chosen.items()}  # the cache's key: what each user is made of
    done, stale = _read_parts(parts, settings, digests)
    if stale and rank == 0:
        print(f"note: {stale} embedding(s) cached in {parts} were made from other pairs (another dataset with the same "
              "--out, or changed pairs) and are not reused.")
    todo = [u for i, u in enumerate(chosen) if i % world == rank and u not in done]
    bar = tqdm(total=len(chosen), initial=len(done), desc="embedding users", unit="user",
               disable=not show_progress or rank != 0)
    for start in range(0, len(todo), batch_users):
        batch = todo[start:start + batch_users]
        embs = embedder.embed([chosen[u] for u in batch], user_ids=batch)
        index = len(list(parts.glob(f"part-{rank:03d}-*.safetensors")))
        atomic_save_safetensors({f"u{i}": e.tokens for i, e in enumerate(embs)},
                                parts / f"part-{rank:03d}-{index:06d}.safetensors",
                                {PART_KEY: dumps_json({"settings": settings, "users": [e.meta for e in embs],
                                                       "pairs": [digests[u] for u in batch]})})
        bar.update(len(batch))
        if progress is not None:
            progress(len(batch))
    bar.close()
    if accelerator is not None:
        accelerator.wait_for_everyone()
    if rank == 0:
        done, _ = _read_parts(parts, settings, digests)
        info = {**settings, "skipped_users": skipped, "unreadable_users": sorted(unreadable)}
        save_embedding_table(out, done, info)
        shutil.rmtree(parts)
        if skipped:
            print(f"note: {len(skipped)} user(s) with fewer than {n_pairs} usable pairs were skipped: "
                  f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}")
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return load_embedding_table(out)[0]
