"""Preference pairs from folders, Pick-a-Pic parquet shards and memory; bad input gives clear errors."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import jpeg_bytes, random_image, write_pair_folder, write_pickapic
from PIL import Image

from ppd_train.pairs import (
    PairError,
    content_hash,
    load_pair_folder,
    load_pickapic,
    load_users,
    pairs_from_images,
    select_pairs,
    split_user_pairs,
)


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_folder_loads_in_order(tmp_path, fmt):
    pairs = load_pair_folder(write_pair_folder(tmp_path / "alice", n=5, fmt=fmt))
    assert len(pairs) == 5 and pairs[0].prompt.endswith("version 0") and pairs[0].user_id == "alice"
    img = pairs[0].chosen.load()
    assert img.mode == "RGB" and img.size == (40, 48)


def test_selection_first_and_seeded_random(tmp_path):
    pairs = load_pair_folder(write_pair_folder(tmp_path / "u", n=6))
    assert select_pairs(pairs, 4) == pairs[:4]
    r1, r2 = select_pairs(pairs, 4, "random", seed=3), select_pairs(pairs, 4, "random", seed=3)
    assert r1 == r2 and r1 != select_pairs(pairs, 4, "random", seed=4)
    with pytest.raises(PairError, match="has 6 usable preference pair.*7 were asked"):
        select_pairs(pairs, 7)
    embed, train = split_user_pairs(pairs, 4, seed=0)
    assert len(embed) == 4 and len(train) == 2 and not set(map(id, embed)) & set(map(id, train))
    assert content_hash(pairs[:4]) == content_hash(load_pair_folder(tmp_path / "u")[:4])
    assert content_hash(pairs[:4]) != content_hash(pairs[1:5])


def test_bad_folders(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairError, match="no pairs.jsonl or pairs.csv"):
        load_pair_folder(tmp_path / "empty")
    folder = write_pair_folder(tmp_path / "u", n=2)
    (folder / "pairs.jsonl").write_text('{"prompt": "x", "chosen": "../../etc/passwd", "rejected": "bad_0.jpg"}\n')
    with pytest.raises(PairError, match="points outside"):
        load_pair_folder(folder)
    (folder / "pairs.jsonl").write_text('{"prompt": "x", "chosen": "nope.png", "rejected": "bad_0.jpg"}\n')
    with pytest.raises(PairError, match="'nope.png' not found"):
        load_pair_folder(folder)
    (folder / "pairs.jsonl").write_text('{"prompt": "x", "chosen": "good_0.png"}\n')
    with pytest.raises(PairError, match=r"missing field\(s\) \['rejected'\]"):
        load_pair_folder(folder)
    (folder / "pairs.jsonl").write_text('{"prompt": "x", \n')
    with pytest.raises(PairError, match="line 1: not valid JSON"):
        load_pair_folder(folder)


def test_corrupt_and_odd_images(tmp_path):
    folder = write_pair_folder(tmp_path / "u", n=1)
    (folder / "good_0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(PairError, match=r"u/pairs.jsonl line 1 \(chosen\).*not a readable image"):
        load_pair_folder(folder)  # checked when the pairs are loaded, not only when an embedder decodes them
    odd = {
        "palette": random_image(1).convert("P"),
        "rgba": random_image(2).convert("RGBA"),
        "grey": random_image(3).convert("L"),
        "16bit": Image.fromarray((np.arange(48 * 40).reshape(48, 40) * 30).astype(np.uint16)),
        "cmyk": random_image(4).convert("CMYK"),
    }
    for name, img in odd.items():
        path = folder / f"{name}.{'jpg' if name == 'cmyk' else 'png'}"
        img.save(path)
        (folder / "pairs.jsonl").write_text(f'{{"prompt": "x", "chosen": "{path.name}", "rejected": "bad_0.jpg"}}\n')
        loaded = load_pair_folder(folder)[0].chosen.load()
        assert loaded.mode == "RGB" and loaded.size == (40, 48), name
    arr = np.asarray(pairs_from_images(["x"], [odd["16bit"]], [odd["grey"]])[0].chosen.load())
    assert arr.max() > 200  # 16-bit range was scaled down, not clipped to white/black


def test_huge_and_tiny_images_are_refused(tmp_path):
    folder = write_pair_folder(tmp_path / "u", n=1)
    Image.new("1", (9000, 8000)).save(folder / "huge.png")
    Image.new("RGB", (4, 4)).save(folder / "tiny.png")
    for name, msg in (("huge", "larger than PPD accepts|too large"), ("tiny", "only 4x4 pixels")):
        (folder / "pairs.jsonl").write_text(f'{{"prompt": "x", "chosen": "{name}.png", "rejected": "bad_0.jpg"}}\n')
        with pytest.raises(PairError, match=msg):
            load_pair_folder(folder)


def test_pickapic_shard(tmp_path):
    rows = []
    for i in range(4):  # user 7: four real preferences, one tie, one unlabeled, one identical pair
        rows.append(dict(caption=f"cat {i}", jpg_0=jpeg_bytes(i), jpg_1=jpeg_bytes(100 + i), label_0=float(i % 2),
                         label_1=float(1 - i % 2), user_id=7))
    rows.append(dict(caption="tie", jpg_0=jpeg_bytes(9), jpg_1=jpeg_bytes(10), label_0=0.5, label_1=0.5, user_id=7))
    rows.append(dict(caption="unl", jpg_0=jpeg_bytes(9), jpg_1=jpeg_bytes(10), label_0=1.0, label_1=0.0, user_id=7,
                     has_label=False))
    rows.append(dict(caption="same", jpg_0=jpeg_bytes(9), jpg_1=jpeg_bytes(9), label_0=1.0, label_1=0.0, user_id=7,
                     are_different=False))
    rows.append(dict(caption="dog", jpg_0=jpeg_bytes(20), jpg_1=jpeg_bytes(21), label_0=0.0, label_1=1.0, user_id=8))
    rows.append(dict(caption="only tie", jpg_0=jpeg_bytes(22), jpg_1=jpeg_bytes(23), label_0=0.5, label_1=0.5,
                     user_id=9))
    shard = write_pickapic(tmp_path / "train-00000.parquet", rows)
    users = load_pickapic(shard)
    assert sorted(users) == ["7", "8"] and len(users["7"]) == 4
    first = users["7"][0]  # label_0 = 0 -> jpg_1 won
    assert first.chosen.raw_bytes() == jpeg_bytes(100) and first.rejected.raw_bytes() == jpeg_bytes(0)
    assert users["7"][1].chosen.raw_bytes() == jpeg_bytes(1)
    assert first.chosen.load().mode == "RGB"
    assert list(load_pickapic(shard, user_ids=[8])) == ["8"]
    with pytest.raises(PairError, match="User 9 has no usable"):
        load_pickapic(shard, user_ids=["9"])
    assert sorted(load_users([shard])) == ["7", "8"]


def test_unknown_parquet_schema(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["x"], "image": [b"1"]}), tmp_path / "other.parquet")
    with pytest.raises(PairError, match=r"not a Pick-a-Pic v2 shard: missing column\(s\) \['caption'"):
        load_pickapic(tmp_path / "other.parquet")


def test_pairs_from_memory():
    a, b = [random_image(1), random_image(2)], [random_image(3), random_image(4)]
    pairs = pairs_from_images(["one caption"], a, b, a_wins=[True, False])
    assert pairs[0].chosen.pil is a[0] and pairs[1].chosen.pil is b[1]
    with pytest.raises(PairError, match="2 'A' images but 1 'B'"):
        pairs_from_images(["x"], a, b[:1])
