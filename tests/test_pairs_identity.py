"""One user is one user, text is data, a file is a file: user ids across column types and sources, the embed cache
keyed by what each user is made of, prompts holding any Unicode line break, captions and contradictions, folders and
FIFOs where a file belongs (issue 25)."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import jpeg_bytes, write_pair_folder, write_pickapic
from PIL import Image

from ppd_train.embed_dataset import embed_users
from ppd_train.embedders.pairdiff import PairDifferenceEmbedder
from ppd_train.embedding import load_embedding_table
from ppd_train.errors import PPDError
from ppd_train.pairs import PairError, canonical_user_id, load_pair_folder, load_pickapic, load_users


def _row(caption, a, b, user, l0=1.0, l1=0.0):
    return dict(caption=caption, jpg_0=jpeg_bytes(a), jpg_1=jpeg_bytes(b), label_0=l0, label_1=l1, user_id=user)


def _shard(path, rows, user_type=None):
    """A Pick-a-Pic shard whose user_id column has the given pyarrow type (int64 as written by default)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    ids = [r["user_id"] for r in rows]
    write_pickapic(path, [{**r, "user_id": 0} for r in rows])
    if user_type is not None:
        table = pq.read_table(path)
        table = table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(ids, user_type))
        pq.write_table(table, path)
    else:
        write_pickapic(path, rows)
    return path


# ----------------------------------------------------------------------------------------------------- user ids
def test_one_spelling_per_user_id():
    assert [canonical_user_id(v, "x") for v in (3, 3.0, "3", " 3 ", -0.0, 2.0**60)] == \
        ["3", "3", "3", "3", "0", str(2**60)]
    assert canonical_user_id("3.0", "x") == "3.0"  # text is a name: only numbers are normalised
    assert [canonical_user_id(v, "x") for v in (None, float("nan"), "", "  ")] == [None] * 4
    for bad in (3.5, float("inf"), True, [3]):
        with pytest.raises(PairError, match=rf"^where: user id {re.escape(repr(bad))} names no user; use text or "
                                            "a whole number"):
            canonical_user_id(bad, "where")


@pytest.mark.parametrize("user_type", ["int64", "float64", "string"])
def test_pickapic_user_ids_are_one_user_whatever_the_column_type(tmp_path, user_type):
    import pyarrow as pa

    ids = {"int64": [3, 3, 4], "float64": [3.0, 3.0, 4.0], "string": ["3", "3", "4"]}[user_type]
    rows = [_row(f"c{i}", 2 * i, 2 * i + 1, u) for i, u in enumerate(ids)]
    shard = _shard(tmp_path / "s.parquet", rows, getattr(pa, user_type)())
    users = load_pickapic(shard)
    assert sorted(users) == ["3", "4"] and len(users["3"]) == 2
    for wanted in ("3", 3, 3.0):  # asked for by any spelling, filtered before the images are read
        assert [p.prompt for p in load_pickapic(shard, [wanted])["3"]] == ["c0", "c1"]


def test_shards_of_different_column_types_hold_one_user(tmp_path):
    import pyarrow as pa

    a = _shard(tmp_path / "a.parquet", [_row("a", 1, 2, 3)], pa.int64())
    b = _shard(tmp_path / "b.parquet", [_row("b", 3, 4, 3.0)], pa.float64())
    c = _shard(tmp_path / "c.parquet", [_row("c", 5, 6, "3")], pa.string())
    assert {u: [p.prompt for p in ps] for u, ps in load_users([a, b, c]).items()} == {"3": ["a", "b", "c"]}


def test_fractional_and_missing_user_ids_in_a_shard(tmp_path):
    import pyarrow as pa

    frac = _shard(tmp_path / "f.parquet", [_row("a", 1, 2, 3.0), _row("b", 3, 4, 3.5)], pa.float64())
    with pytest.raises(PairError, match=r"f\.parquet column 'user_id': user id 3\.5 names no user"):
        load_pickapic(frac)
    rows = [_row("a", 1, 2, 3), _row("b", 3, 4, None), _row("c", 5, 6, 4.0)]
    missing = _shard(tmp_path / "m.parquet", rows, pa.float64())
    problems: list[str] = []
    users = load_pickapic(missing, problems=problems)
    assert sorted(users) == ["3", "4"] and "None" not in users
    assert problems == ["1 Pick-a-Pic row(s) skipped without a user id (null or blank 'user_id'): m.parquet row 1"]
    nan = _shard(tmp_path / "n.parquet", [_row("a", 1, 2, 3.0), _row("b", 3, 4, float("nan"))], pa.float64())
    problems.clear()
    assert list(load_pickapic(nan, problems=problems)) == ["3"] and "without a user id" in problems[0]
    with pytest.raises(PairError, match=r"^The user_id asked for is empty \(' '\)"):
        load_pickapic(missing, [" "])


def test_an_empty_shard_is_named(tmp_path):
    shard = _shard(tmp_path / "s.parquet", [_row("a", 1, 2, 3)])
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(shard).slice(0, 0), tmp_path / "empty.parquet")
    with pytest.raises(PairError, match=rf"^{tmp_path / 'empty.parquet'} holds no rows \(an empty shard\)"):
        load_users([shard, tmp_path / "empty.parquet"])


def test_folder_user_ids_follow_the_same_rule(tmp_path):
    folder = write_pair_folder(tmp_path / "f", n=3)
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    for row, uid in zip(rows, (3, 3.0, None)):
        row["user_id"] = uid
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [p.user_id for p in load_pair_folder(folder)] == ["3", "3", "f"]
    rows[0]["user_id"] = 2.5
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PairError, match=r"^f/pairs\.jsonl line 1: 'user_id': user id 2\.5 names no user"):
        load_pair_folder(folder)


# --------------------------------------------------------------------------------------------------- sources
def test_a_user_in_two_sources_is_refused_unless_merged(tmp_path):
    anna1 = write_pair_folder(tmp_path / "one", n=2, seed=1, user_id="anna")
    anna2 = write_pair_folder(tmp_path / "two", n=3, seed=2, user_id="anna")
    with pytest.raises(PairError, match=rf"^User 'anna' is in both {anna1} and {anna2}: PPD would take two people "
                                        r"for one .* or pass --merge-users"):
        load_users([anna1, anna2])
    merged = load_users([anna1, anna2], merge_users=True)
    assert list(merged) == ["anna"] and len(merged["anna"]) == 5
    copy = tmp_path / "copy"
    copy.mkdir()
    for f in anna1.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    with pytest.raises(PairError, match=r"^Merging user 'anna' of .*: copy/pairs\.jsonl line 1 repeats "
                                        r"one/pairs\.jsonl line 1 \(same prompt and images\)"):
        load_users([anna1, copy], merge_users=True)  # merged, a pair in both would count twice


def test_a_source_given_twice_is_refused(tmp_path, monkeypatch):
    folder = write_pair_folder(tmp_path / "ann", n=2)
    monkeypatch.chdir(tmp_path)
    for twice in (["ann", "ann"], ["ann", "./ann/"], [str(folder), "ann"]):
        with pytest.raises(PairError, match=rf"^{re.escape(str(Path(twice[1])))} is given twice \(also as "
                                            rf"{re.escape(str(Path(twice[0])))}\); its pairs would count twice"):
            load_users(twice)
    shard = _shard(tmp_path / "s.parquet", [_row("a", 1, 2, 3)])
    with pytest.raises(PairError, match="is given twice"):
        load_users([shard, tmp_path / "." / "s.parquet"])


def _mean_colour(images):
    return torch.stack([torch.from_numpy(np.asarray(im.resize((4, 4)), dtype=np.float32).reshape(-1, 3).mean(0))
                        for im in images])


def test_embed_reuses_only_what_was_made_from_the_same_pairs(tmp_path, capsys):
    """A run killed on dataset A, then the same --out on dataset B: the table holds B's users, each embedded from B's
    pairs (byte for byte as a fresh run), never A's; users whose pairs did not change are not embedded again."""
    embedder = PairDifferenceEmbedder(_mean_colour, "mean")
    a = load_users([write_pair_folder(tmp_path / "a" / u, n=2, seed=s) for s, u in enumerate(("u1", "u2", "u3"))])
    b = load_users([write_pair_folder(tmp_path / "b" / u, n=2, seed=10 + s) for s, u in enumerate(("u1", "u2"))]
                   + [write_pair_folder(tmp_path / "b" / "u3", n=2, seed=2)])  # u3: the same pairs as in A
    out = tmp_path / "t.safetensors"

    def stop(n):
        raise KeyboardInterrupt  # killed after the first batch

    with pytest.raises(KeyboardInterrupt):
        embed_users(a, embedder, out, n_pairs=2, batch_users=3, show_progress=False, progress=stop)
    capsys.readouterr()
    done: list[int] = []
    embed_users(b, embedder, out, n_pairs=2, batch_users=1, show_progress=False, progress=done.append)
    assert "note: 2 embedding(s) cached in" in capsys.readouterr().out and sum(done) == 2  # u3 reused
    fresh = tmp_path / "fresh.safetensors"
    embed_users(b, embedder, fresh, n_pairs=2, batch_users=1, show_progress=False)
    assert out.read_bytes() == fresh.read_bytes()
    table, _ = load_embedding_table(out)
    assert all(table[u].meta["pair_sources"][0].startswith(f"{u}/") for u in table)


def test_embed_refuses_parts_of_mixed_token_shapes(tmp_path):
    widths = iter([3, 5])

    def changing(images):  # an embedder that changed between two runs on one --out
        w = next(widths)
        return torch.ones(len(images), w)

    users = load_users([write_pair_folder(tmp_path / u, n=2, seed=s) for s, u in enumerate(("u1", "u2"))])
    out = tmp_path / "t.safetensors"
    with pytest.raises(PPDError, match=r"part-000-000001\.safetensors: user u2's embedding is \(2, 5\) tokens x width, "
                                       r"the others' \(2, 3\): the embedder changed shape within one run\. Delete"):
        embed_users(users, PairDifferenceEmbedder(changing, "x"), out, n_pairs=2, batch_users=1, show_progress=False)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------ text
@pytest.mark.parametrize("brk", ["\u2028", "\u2029", "\u0085"])  # json.dumps escapes the ASCII ones
def test_a_prompt_holding_any_unicode_line_break_loads_intact(tmp_path, brk):
    folder = write_pair_folder(tmp_path / "u", n=2)
    rows = [{"prompt": f"first{brk}line", "chosen": "good_0.png", "rejected": "bad_0.jpg"},
            {"prompt": "second", "chosen": "good_1.png", "rejected": "bad_1.jpg"}]
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)  # as the picker writes it: raw
    assert brk in text
    (folder / "pairs.jsonl").write_bytes(text.encode())
    pairs = load_pair_folder(folder)
    assert [p.prompt for p in pairs] == [f"first{brk}line", "second"]
    assert [p.source for p in pairs] == ["u/pairs.jsonl line 1", "u/pairs.jsonl line 2"]
    (folder / "pairs.jsonl").write_bytes(text.replace("\n", "\r\n").encode())  # Windows line ends
    assert [p.prompt for p in load_pair_folder(folder)] == [f"first{brk}line", "second"]


def test_pickapic_captions_must_be_text(tmp_path):
    rows = [_row("good", 1, 2, 3), _row(None, 3, 4, 3), _row("   ", 5, 6, 3), _row("", 7, 8, 3), _row(None, 9, 10, 4)]
    shard = _shard(tmp_path / "s.parquet", rows)
    problems: list[str] = []
    users = load_pickapic(shard, problems=problems)
    assert {u: [p.prompt for p in ps] for u, ps in users.items()} == {"3": ["good"]}
    assert problems == ["4 Pick-a-Pic row(s) skipped without a caption (null or blank 'caption'; a pair needs the "
                        "prompt its images were made for): s.parquet row 1; s.parquet row 2; s.parquet row 3; "
                        "s.parquet row 4"]
    with pytest.raises(PairError, match="^User 4 has no usable pairs in s.parquet: .*has no caption"):
        load_pickapic(shard, ["4"], problems=[])


@pytest.mark.parametrize("order", [(0, 1, 2), (2, 1, 0), (1, 0, 2)])
def test_a_reversed_comparison_cancels_in_any_order(tmp_path, order):
    """A over B and B over A, same user and caption: the user said nothing; both rows are dropped and named, in
    whatever order the rows come (a repeat of one direction does not save it)."""
    rows = [_row("cat", 1, 2, 3), _row("cat", 2, 1, 3), _row("cat", 1, 2, 3, l0=1.0, l1=0.0)]
    rows = [rows[i] for i in order] + [_row("dog", 5, 6, 3), _row("cat", 1, 2, 4, l0=0.0, l1=1.0)]
    problems: list[str] = []
    users = load_pickapic(_shard(tmp_path / "s.parquet", rows), problems=problems)
    assert [p.prompt for p in users["3"]] == ["dog"] and len(users["4"]) == 1  # another user's row is their own
    rows_named = [f"s.parquet row {order.index(i)}" for i in range(3)]
    assert problems == ["1 Pick-a-Pic comparison(s) dropped because the same user preferred each image once (same "
                        "caption and images: the rows cancel out): "
                        + " vs ".join(sorted(rows_named, key=lambda r: int(r.split()[-1]))) + " (user 3)"]


def test_a_reversed_row_in_a_pair_file_is_refused(tmp_path):
    folder = write_pair_folder(tmp_path / "u", n=2)
    rows = [{"prompt": "p", "chosen": "good_1.png", "rejected": "bad_1.jpg"},
            {"prompt": "p", "chosen": "good_0.png", "rejected": "bad_0.jpg"},
            {"prompt": "p", "chosen": "bad_1.jpg", "rejected": "good_1.png"}]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(PairError, match=r"^u/pairs\.jsonl line 3 reverses pairs\.jsonl line 1 \(same prompt and "
                                        r"images, the other image preferred\): the two cancel out"):
        load_pair_folder(folder)
    rows[2]["prompt"] = "another prompt"  # the same images for another prompt are another comparison
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert len(load_pair_folder(folder)) == 3


# ------------------------------------------------------------------------------------------- not a regular file
def test_a_folder_or_fifo_where_a_file_belongs(tmp_path):
    folder = write_pair_folder(tmp_path / "u", n=1)
    (folder / "dir.png").mkdir()
    os.mkfifo(folder / "fifo.png")
    for name, what in (("dir.png", "a folder, not a file"), ("fifo.png", r"not a regular file \(a FIFO, socket or "
                                                                          r"device\)")):
        (folder / "pairs.jsonl").write_text(json.dumps({"prompt": "x", "chosen": name, "rejected": "bad_0.jpg"}))
        message = _refusal_of_fifo(folder / "fifo.png", lambda: load_pair_folder(folder))
        assert re.match(rf"^u/pairs\.jsonl line 1: image '{name}' in {folder} is {what}; name an image file", message)
    (folder / "pairs.jsonl").unlink()
    (folder / "pairs.jsonl").mkdir()
    with pytest.raises(PairError, match=rf"^{folder / 'pairs.jsonl'} is a folder, not a file; the pair file must be"):
        load_pair_folder(folder)
    (folder / "pairs.jsonl").rmdir()
    os.mkfifo(folder / "pairs.csv")
    assert re.match(rf"^{folder / 'pairs.csv'} is not a regular file", _refusal_of_fifo(folder / "pairs.csv",
                                                                                    lambda: load_pair_folder(folder)))
    (folder / "pairs.csv").unlink()
    write_pair_folder(folder, n=1)
    with pytest.raises(PairError, match=rf"^{folder / 'pairs.jsonl'} is not a folder; give the pair folder"):
        load_pair_folder(folder / "pairs.jsonl")
    (tmp_path / "d.parquet").mkdir()
    os.mkfifo(tmp_path / "f.parquet")
    with pytest.raises(PairError, match=r"d\.parquet is a folder, not a file; give a Pick-a-Pic \.parquet file"):
        load_pickapic(tmp_path / "d.parquet")
    assert "f.parquet is not a regular file" in _refusal_of_fifo(tmp_path / "f.parquet",
                                                                 lambda: load_pickapic(tmp_path / "f.parquet"))


def _refusal_of_fifo(fifo, fn) -> str:
    """fn's refusal; a reader that opened the FIFO instead would block forever, so after 10 s the FIFO is opened for
    writing and closed (the reader sees an empty file) and the test fails instead of hanging."""
    result: list[str] = []

    def run():
        try:
            fn()
            result.append("accepted")
        except PairError as e:
            result.append(str(e))

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(10)
    if reader.is_alive():
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        reader.join(10)
        return "the FIFO was opened and read"
    return result[0]


def test_an_image_too_narrow_is_named_by_its_own_size(tmp_path):
    folder = write_pair_folder(tmp_path / "u", n=1)
    Image.new("RGB", (3000, 10)).save(folder / "strip.png")
    (folder / "pairs.jsonl").write_text(json.dumps({"prompt": "x", "chosen": "strip.png", "rejected": "bad_0.jpg"}))
    (pair,) = load_pair_folder(folder)  # the header passes: 10 px is enough
    with pytest.raises(PairError, match=r"^u/pairs\.jsonl line 1 \(chosen\): image is 3000x10, too narrow for its "
                                        r"length: scaled to 1536 px on its long side it would be 1536x5 \(< 8 px\)\."):
        pair.chosen.load()
    Image.new("RGB", (3000, 16)).save(folder / "strip.png")
    assert load_pair_folder(folder)[0].chosen.load().size == (1536, 8)


def test_prepare_reuses_its_file_only_for_the_same_images(image_encoders, tmp_path, capsys):
    """Another dataset with the same folder names, prompts and file names (other pictures) is encoded again, never
    answered with the old latents."""
    from ppd_train.dpo_data import DPOData
    from ppd_train.prepare import prepare_dpo_data

    folder = write_pair_folder(tmp_path / "anna", n=2, seed=0)

    def prepare():
        return prepare_dpo_data(load_users([folder]), image_encoders / "effnet_encoder.safetensors",
                                image_encoders / "clip_g", tmp_path / "dpo.safetensors", image_size=64,
                                show_progress=False)

    first = prepare().latents_w.clone()
    capsys.readouterr()
    write_pair_folder(tmp_path / "anna", n=2, seed=5)  # the same names and prompts, other images
    again = prepare()
    assert "up to date" not in capsys.readouterr().out and not torch.equal(again.latents_w, first)
    assert torch.equal(DPOData.load(tmp_path / "dpo.safetensors").latents_w, again.latents_w)


def test_the_from_images_node_splits_captions_on_newlines_only(pack):
    import importlib

    node = importlib.import_module(f"{pack.__name__}.nodes.pair_nodes").PPDPreferencePairsFromImages()
    images = torch.rand(2, 16, 16, 3, generator=torch.Generator().manual_seed(0))
    (pairs,) = node.build(images, images.flip(0), "a lighthouse\u2028at dusk\r\n\nsecond\u0085caption\n", "AB")
    assert [p.prompt for p in pairs] == ["a lighthouse\u2028at dusk", "second\u0085caption"]
