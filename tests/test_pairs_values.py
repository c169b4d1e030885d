"""Preference pairs on values: pixel conversions, size limits at their edges, row numbering, selection order, label
direction, and how sources merge."""

from __future__ import annotations

import re

import numpy as np
import pytest
from helpers import jpeg_bytes, random_image, write_pair_folder, write_pickapic
from PIL import Image

from ppd_train.pairs import (
    MAX_SIDE,
    ImageRef,
    PairError,
    content_hash,
    load_pair_folder,
    load_pickapic,
    load_users,
    pairs_from_images,
    select_pairs,
    split_user_pairs,
    to_rgb,
)


def _pixel(img: Image.Image, xy=(0, 0)):
    return to_rgb(img).getpixel(xy)


def test_high_bit_depth_is_scaled_not_clipped():
    sixteen = Image.fromarray(np.array([[0, 32768, 65535] * 4] * 12, dtype=np.uint16))
    assert [_pixel(sixteen, (x, 0)) for x in range(3)] == [(0, 0, 0), (128, 128, 128), (255, 255, 255)]
    wide = Image.fromarray(np.array([[0, 1000, 65535] * 4] * 12, dtype=np.int32), "I")  # 32-bit, above 255
    assert _pixel(wide, (1, 0)) == (4, 4, 4)
    small = Image.fromarray(np.array([[0, 100, 255] * 4] * 12, dtype=np.int32), "I")  # 32-bit within 0..255
    assert [_pixel(small, (x, 0))[0] for x in range(3)] == [0, 100, 255]
    floats = Image.fromarray(np.array([[0.0, 32768.0, 65535.0] * 4] * 12, dtype=np.float32), "F")
    assert [_pixel(floats, (x, 0))[0] for x in range(3)] == [0, 128, 255]  # above 255: a 16-bit range


def test_transparency_is_composited_on_white():
    rgba = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    rgba.putpixel((1, 0), (0, 0, 0, 255))
    rgba.putpixel((2, 0), (0, 0, 0, 128))
    assert [_pixel(rgba, (x, 0)) for x in range(3)] == [(255, 255, 255), (0, 0, 0), (127, 127, 127)]
    assert _pixel(Image.new("LA", (10, 10), (0, 0))) == (255, 255, 255)
    palette = Image.new("P", (10, 10), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert _pixel(palette) == (10, 20, 30)  # no transparency entry: the colour itself
    palette.info["transparency"] = 0
    assert _pixel(palette) == (255, 255, 255)


def test_size_limits_at_their_edges():
    assert to_rgb(Image.new("RGB", (MAX_SIDE, 20))).size == (MAX_SIDE, 20)  # at the limit: untouched
    assert to_rgb(Image.new("RGB", (2 * MAX_SIDE + 2, 40))).size == (MAX_SIDE, 20)  # above: downscaled, aspect kept
    assert to_rgb(Image.new("RGB", (30, 3 * MAX_SIDE))).size == (10, MAX_SIDE)
    assert to_rgb(Image.new("RGB", (8, 8))).size == (8, 8)
    with pytest.raises(PairError, match=r"where: image is only 7x9 pixels"):
        to_rgb(Image.new("RGB", (7, 9)), "where")


def test_in_memory_images_hash_their_pixels_mode_and_size():
    a = Image.new("L", (16, 8), 0)
    same = pairs_from_images(["x"], [a], [a.copy()])
    assert content_hash(same) == content_hash(pairs_from_images(["x"], [a.copy()], [a]))
    for other in (Image.new("L", (8, 16), 0), Image.new("P", (16, 8), 0), Image.new("L", (16, 8), 1)):
        assert content_hash(pairs_from_images(["x"], [other], [a])) != content_hash(same)
    assert content_hash(pairs_from_images(["y"], [a], [a])) != content_hash(same)  # the caption counts
    assert ImageRef(data=b"abc").raw_bytes() == b"abc"


def test_selection_keeps_the_original_order():
    pairs = pairs_from_images([f"c{i}" for i in range(10)], [random_image(i) for i in range(10)],
                              [random_image(20 + i) for i in range(10)])
    for seed in range(5):
        chosen = select_pairs(pairs, 4, "random", seed)
        positions = [pairs.index(p) for p in chosen]
        assert positions == sorted(positions) and len(set(positions)) == 4
    assert {tuple(pairs.index(p) for p in select_pairs(pairs, 4, "random", s)) for s in range(5)} != {(0, 1, 2, 3)}
    assert select_pairs(pairs, 10, "first") == pairs
    assert select_pairs(pairs, 1) == pairs[:1] and len(select_pairs(pairs, 1, "random", 3)) == 1
    for n in (0, -1):
        with pytest.raises(PairError, match=f"Asked for {n} pairs"):
            select_pairs(pairs, n)
    with pytest.raises(PairError, match="Unknown pair selection 'best'"):
        select_pairs(pairs, 2, "best")
    with pytest.raises(PairError, match="anna has 10 usable preference pair"):
        select_pairs(pairs, 11, who="anna")
    embed, train = split_user_pairs(pairs[:5], 4)
    assert len(embed) == 4 and len(train) == 1 and set(map(id, embed + train)) == set(map(id, pairs[:5]))
    with pytest.raises(PairError, match="anna has 4 pairs; at least 5 are needed"):
        split_user_pairs(pairs[:4], 4, who="anna")
    with pytest.raises(PairError, match="^this user has 4 pairs"):
        split_user_pairs(pairs[:4], 4)
    with pytest.raises(PairError, match="^this user has 10 usable"):
        select_pairs(pairs, 11)


def test_pair_files_number_their_rows(tmp_path):
    folder = write_pair_folder(tmp_path / "anna", n=3)
    lines = (folder / "pairs.jsonl").read_text().splitlines()
    (folder / "pairs.jsonl").write_text(lines[0] + "\n\n   \n" + lines[1] + "\n")  # blank lines are skipped
    pairs = load_pair_folder(folder)
    assert [p.source for p in pairs] == ["anna/pairs.jsonl line 1", "anna/pairs.jsonl line 4"]
    assert pairs[1].chosen.where == "anna/pairs.jsonl line 4 (chosen)" and pairs[1].rejected.path.name == "bad_1.jpg"
    assert pairs[0].user_id == "anna" and pairs[0].prompt == "a lighthouse at dusk, version 0"
    (folder / "pairs.jsonl").write_text('["prompt", "chosen", "rejected"]\n')
    with pytest.raises(PairError, match="line 1: expected a JSON object"):
        load_pair_folder(folder)
    (folder / "pairs.jsonl").write_text("\n\n")
    with pytest.raises(PairError, match="the pair file has no rows"):
        load_pair_folder(folder)
    (folder / "pairs.jsonl").unlink()
    csv_folder = write_pair_folder(tmp_path / "ben", n=2, fmt="csv", user_id="b-7")
    pairs = load_pair_folder(csv_folder)
    assert [p.source for p in pairs] == ["ben/pairs.csv row 2", "ben/pairs.csv row 3"]  # row 1 is the header
    assert {p.user_id for p in pairs} == {"b-7"} and pairs[0].rejected.where == "ben/pairs.csv row 2 (rejected)"
    (csv_folder / "pairs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(PairError, match="no rows"):
        load_pair_folder(csv_folder)
    with pytest.raises(PairError, match="Pair folder not found"):
        load_pair_folder(tmp_path / "nobody")


def test_jsonl_wins_over_csv_and_paths_are_checked(tmp_path):
    folder = write_pair_folder(tmp_path / "u", n=2)
    write_pair_folder(folder, n=1, fmt="csv")
    with pytest.raises(PairError, match="has both pairs.jsonl and pairs.csv"):  # never silently one of them
        load_pair_folder(folder)
    (folder / "pairs.csv").unlink()
    outside = "points outside|leaves the pair folder"
    for rel, msg in (("", "image path is empty"), (str(folder / "good_0.png"), outside),
                     ("sub/../../u2/x.png", outside), ("missing.png", "'missing.png' not found")):
        (folder / "pairs.jsonl").write_text(f'{{"prompt": "x", "chosen": "{rel}", "rejected": "bad_0.jpg"}}\n')
        with pytest.raises(PairError, match=msg):
            load_pair_folder(folder)
    (folder / "sub").mkdir()
    Image.new("RGB", (9, 9)).save(folder / "sub" / "ok.png")
    (folder / "pairs.jsonl").write_text('{"prompt": 7, "chosen": "sub/ok.png", "rejected": "bad_0.jpg"}\n')
    with pytest.raises(PairError, match="'prompt' is 7"):  # a number is no prompt (issue 13)
        load_pair_folder(folder)
    (folder / "pairs.jsonl").write_text('{"prompt": "7", "chosen": "sub/ok.png", "rejected": "bad_0.jpg"}\n')
    (pair,) = load_pair_folder(folder)
    assert pair.prompt == "7" and pair.chosen.load().size == (9, 9)


def test_pickapic_labels_filters_and_merging(tmp_path):
    rows = [dict(caption="a", jpg_0=jpeg_bytes(1), jpg_1=jpeg_bytes(2), label_0=1.0, label_1=0.0, user_id=3),
            dict(caption="b", jpg_0=jpeg_bytes(3), jpg_1=jpeg_bytes(4), label_0=0.0, label_1=1.0, user_id=3),
            dict(caption="c", jpg_0=jpeg_bytes(5), jpg_1=jpeg_bytes(6), label_0=1.0, label_1=0.0, user_id=4),
            dict(caption="d", jpg_0=jpeg_bytes(7), jpg_1=jpeg_bytes(8), label_0=1.0, label_1=None, user_id=4),
            dict(caption="e", jpg_0=jpeg_bytes(7), jpg_1=jpeg_bytes(8), label_0=None, label_1=1.0, user_id=4)]
    shard = write_pickapic(tmp_path / "s.parquet", rows)
    users = load_pickapic(str(shard))  # a single path as a string
    first, second = users["3"]
    assert first.chosen.raw_bytes() == jpeg_bytes(1) and first.rejected.raw_bytes() == jpeg_bytes(2)
    assert second.chosen.raw_bytes() == jpeg_bytes(4) and second.prompt == "b" and second.user_id == "3"
    assert second.source.startswith("s.parquet row 1") and second.chosen.where.startswith("s.parquet row 1")
    assert "(jpg_1" in second.chosen.where and "(jpg_0" in second.rejected.where and first.prompt == "a"
    assert [p.prompt for p in users["4"]] == ["c"]  # a missing label is no preference
    assert list(load_pickapic([shard], user_ids=[4, "3"])) == ["3", "4"]
    with pytest.raises(PairError, match="Parquet shard not found"):
        load_pickapic(tmp_path / "none.parquet")
    (tmp_path / "bad.parquet").write_bytes(b"not parquet")
    with pytest.raises(PairError, match="is not a readable parquet file"):
        load_pickapic(tmp_path / "bad.parquet")
    folder = write_pair_folder(tmp_path / "3", n=2)  # a folder named like a user of the shard: one user only if told
    with pytest.raises(PairError, match=rf"^User '3' is in both {shard} and {folder}: .*--merge-users"):
        load_users([shard, folder])
    merged = load_users([shard, folder, write_pair_folder(tmp_path / "zoe", n=1)], merge_users=True)
    assert sorted(merged) == ["3", "4", "zoe"] and len(merged["3"]) == 4 and len(merged["zoe"]) == 1
    with pytest.raises(PairError, match="No usable preference pairs"):
        load_users([])


def test_images_in_memory(tmp_path):
    a, b = [random_image(1), random_image(2)], [random_image(3), random_image(4)]
    pairs = pairs_from_images(["p", "q"], a, b, a_wins=False, user_id="me")
    assert [p.chosen.pil for p in pairs] == b and [p.rejected.pil for p in pairs] == a
    assert [p.prompt for p in pairs] == ["p", "q"]
    mixed = pairs_from_images(["p"], a, b, a_wins=[True, False])
    assert [(p.chosen.pil, p.rejected.pil) for p in mixed] == [(a[0], b[0]), (b[1], a[1])]
    assert pairs[1].source == "pair 2" and pairs[1].rejected.where == "pair 2 (A)" and pairs[0].user_id == "me"
    with pytest.raises(PairError, match="Got 3 captions for 2 image pairs"):
        pairs_from_images(["1", "2", "3"], a, b)
    with pytest.raises(PairError, match="Got 1 winner flags for 2 pairs"):
        pairs_from_images(["x"], a, b, a_wins=[True])
    (one,) = pairs_from_images(["only"], a[:1], b[:1])
    assert one.chosen.pil is a[0] and one.user_id == "" and one.chosen.where == "pair 1 (A)"
    assert pairs[1].chosen.where == "pair 2 (B)"


def test_pair_files_are_utf8_and_csv_keeps_quoted_line_breaks(tmp_path):
    import csv
    import json

    folder = write_pair_folder(tmp_path / "u", n=1)
    prompt = "Café at dusk, 夕暮れ"
    (folder / "pairs.jsonl").write_bytes((json.dumps({"prompt": prompt, "chosen": "good_0.png",
                                                      "rejected": "bad_0.jpg"}, ensure_ascii=False) + "\n").encode())
    assert load_pair_folder(folder)[0].prompt == prompt
    (folder / "pairs.jsonl").unlink()
    with (folder / "pairs.csv").open("w", newline="", encoding="utf-8") as f:  # csv's own \r\n line ends
        writer = csv.writer(f)
        writer.writerow(["prompt", "chosen", "rejected"])
        writer.writerow([prompt + "\r\nsecond line", "good_0.png", "bad_0.jpg"])
    (pair,) = load_pair_folder(folder)
    assert pair.prompt == prompt + "\r\nsecond line" and pair.source == "u/pairs.csv row 2"


def test_pickapic_skips_each_bad_row_and_reads_on(tmp_path):
    """A missing image, a repeated comparison, are_different = False and unreadable images each drop their own row
    only; the unreadable ones are reported once, the first five named; an unknown user's refusal names every shard
    and the shortest user ids first."""
    from ppd_train.pairs import ImageRef

    def row(caption, a, b, user, **kw):
        return dict(caption=caption, jpg_0=a, jpg_1=b, label_0=1.0, label_1=0.0, user_id=user, **kw)

    rows = [row("g1", jpeg_bytes(1), jpeg_bytes(2), 1), row("no image", jpeg_bytes(3), None, 1),
            row("g2", jpeg_bytes(4), jpeg_bytes(5), 1), row("g1", jpeg_bytes(1), jpeg_bytes(2), 1),
            row("g3", jpeg_bytes(6), jpeg_bytes(7), 1),
            row("marked same", jpeg_bytes(8), jpeg_bytes(9), 1, are_different=False)]
    rows += [row(f"junk {i}", b"junk %d" % i, jpeg_bytes(10), 2) for i in range(6)]
    rows += [row("h1", jpeg_bytes(11), jpeg_bytes(12), 2)]
    a = write_pickapic(tmp_path / "a.parquet", rows)
    b = write_pickapic(tmp_path / "b.parquet", [row(f"u{u}", jpeg_bytes(20 + u), jpeg_bytes(40 + u), u)
                                                for u in range(3, 11)])
    problems: list[str] = []
    users = load_users([a, b], problems=problems)
    assert [p.prompt for p in users["1"]] == ["g1", "g2", "g3"] and [p.prompt for p in users["2"]] == ["h1"]
    assert sorted(users, key=int) == [str(u) for u in range(1, 11)]

    def unreadable(i):
        with pytest.raises(PairError) as e:
            ImageRef(data=b"junk %d" % i, where=f"a.parquet row {6 + i} (jpg_0, user 2)").check()
        return str(e.value)

    def same(got, want):  # PIL's messages name a BytesIO object by its address
        return [re.sub(" at 0x[0-9a-f]+", "", g) for g in got] == [re.sub(" at 0x[0-9a-f]+", "", w) for w in want]

    assert same(problems, ["6 Pick-a-Pic row(s) skipped for unreadable images: "
                        + "; ".join(unreadable(i) for i in range(5)) + " ..."])
    five = write_pickapic(tmp_path / "c.parquet", rows[6:11] + rows[12:])
    problems.clear()
    load_pickapic(five, problems=problems)
    assert same(problems, ["5 Pick-a-Pic row(s) skipped for unreadable images: "
                           + "; ".join(unreadable(i).replace("a.parquet", "c.parquet").replace(f"row {6 + i}",
                                                                                               f"row {i}")
                                       for i in range(5))])
    with pytest.raises(PairError, match=r"^User 99 is not in a\.parquet, b\.parquet \(it holds 10 users, for example "
                                        r"1, 2, 3, 4, 5, 6, 7, 8\)\."):
        load_pickapic([a, b], user_ids=["99"])


def test_a_bad_folder_is_reported_and_the_next_one_read(tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    good = write_pair_folder(tmp_path / "good", n=1)
    problems: list[str] = []
    assert list(load_users([bad, good], problems=problems)) == ["good"]
    assert len(problems) == 1 and problems[0].startswith(f"{bad} has no pairs.jsonl or pairs.csv")


def test_an_empty_user_id_means_the_folder_and_csv_rows_count_their_fields(tmp_path):
    import json

    folder = write_pair_folder(tmp_path / "ann", n=1)
    row = {"prompt": "p", "chosen": "good_0.png", "rejected": "bad_0.jpg", "user_id": ""}
    (folder / "pairs.jsonl").write_text(json.dumps(row) + "\n")
    assert load_pair_folder(folder)[0].user_id == "ann"
    (folder / "pairs.jsonl").unlink()
    (folder / "pairs.csv").write_text("prompt,chosen,rejected\np,good_0.png,bad_0.jpg,extra\n")
    with pytest.raises(PairError, match=r"row 2 has 4 field\(s\) but the header has 3 \(prompt, chosen, rejected\)"):
        load_pair_folder(folder)


def img_dtype(mode: str) -> str:
    return {"I;16": "=u2", "I;16B": ">u2", "I;16L": "<u2"}[mode]


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I;16L"])
def test_every_16_bit_value_maps_to_the_nearest_8_bit_one(mode):
    """Each 16-bit value v becomes round(v * 255 / 65535), in all three byte orders PIL names."""
    v = np.arange(65536, dtype=np.int64).reshape(256, 256)
    img = Image.frombytes(mode, (256, 256), v.astype(img_dtype(mode)).tobytes())
    got = np.asarray(to_rgb(img))
    want = (2 * 255 * v + 65535) // (2 * 65535)  # round half up, in integers
    assert (got == want[..., None]).all()
    dark = Image.frombytes(mode, (16, 16), np.full((16, 16), 200).astype(img_dtype(mode)).tobytes())  # all <= 255
    assert _pixel(dark) == (1, 1, 1)  # still a 16-bit range, not stretched as if 8-bit


def test_32_bit_images_below_zero_and_just_past_8_bits():
    img = Image.fromarray(np.array([[-65535, 0, 256] * 4] * 12, dtype=np.int32), "I")  # max 256 > 255: a 16-bit range
    assert [_pixel(img, (x, 0))[0] for x in range(3)] == [0, 0, 1]


def test_palette_with_alpha_is_composited_on_white():
    img = Image.new("PA", (10, 10), (0, 0))
    img.putpalette([10, 20, 30] * 256)
    assert _pixel(img) == (255, 255, 255)
