"""Order-free data loading, as properties (issue 28 item 5): shuffled Pick-a-Pic rows or pair-file lines give the same
pairs, repeats and reversals are found in any order and direction, and pair files round-trip any prompt text.

Examples are few, derandomized (the same examples on every run) and without deadlines, so CI stays fast and
deterministic. Images are made once per module; the properties only reorder and rename them.
"""

from __future__ import annotations

import csv
import json
import random

import pytest
from helpers import jpeg_bytes, random_image, write_pickapic
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ppd_train.pairs import PairError, load_pair_folder, load_pickapic

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True,
                    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
IMAGES = [jpeg_bytes(i) for i in range(6)]


def _content(users: dict) -> set[tuple]:
    """The pairs as what they say (user, prompt, winner bytes, loser bytes), without where they came from."""
    return {(u, p.prompt, p.chosen.raw_bytes(), p.rejected.raw_bytes()) for u, ps in users.items() for p in ps}


# a Pick-a-Pic row: (user, caption, image a, image b, which won: 0 = a, 1 = b, 2 = a tie)
ROWS = st.lists(st.tuples(st.sampled_from([1, 2]), st.sampled_from(["cat", "dog"]), st.integers(0, 3),
                          st.integers(0, 3), st.integers(0, 2)), min_size=1, max_size=10)


def _pickapic_rows(rows):
    labels = {0: (1.0, 0.0), 1: (0.0, 1.0), 2: (0.5, 0.5)}
    return [dict(caption=c, jpg_0=IMAGES[a], jpg_1=IMAGES[b], label_0=labels[w][0], label_1=labels[w][1], user_id=u)
            for u, c, a, b, w in rows]


def _expected(rows) -> set[tuple]:
    """The rule, written out: per (user, caption, the two images) one pair if every row says the same winner, none if
    the rows disagree; ties and the same image twice say nothing."""
    said: dict[tuple, set[tuple[int, int]]] = {}
    for u, c, a, b, w in rows:
        if w == 2 or a == b:
            continue
        won, lost = (a, b) if w == 0 else (b, a)
        said.setdefault((str(u), c, min(a, b), max(a, b)), set()).add((won, lost))
    return {(u, c, IMAGES[won], IMAGES[lost]) for (u, c, _, _), ways in said.items() if len(ways) == 1
            for won, lost in ways}


@SETTINGS
@given(rows=ROWS, seed=st.integers(0, 2**16))
def test_pickapic_pairs_do_not_depend_on_row_order(tmp_path_factory, rows, seed):
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    folder = tmp_path_factory.mktemp("pp")
    got = []
    for name, these in (("a", rows), ("b", shuffled)):
        path = write_pickapic(folder / f"{name}.parquet", _pickapic_rows(these))
        users = load_pickapic(path, problems=[])
        got.append(_content(users))
        for u, pairs in users.items():  # 'first' is file order: each user's pairs as their rows come
            first_rows = [p.source for p in pairs]
            assert first_rows == sorted(first_rows, key=lambda s: int(s.split()[-1])), u
    assert got[0] == got[1] == _expected(rows)


@SETTINGS
@given(rows=ROWS, split=st.integers(0, 10))
def test_repeats_and_reversals_are_found_across_shards(tmp_path_factory, rows, split):
    folder = tmp_path_factory.mktemp("pp")
    a = write_pickapic(folder / "a.parquet", _pickapic_rows(rows[:split] or rows[:1]))
    b = write_pickapic(folder / "b.parquet", _pickapic_rows(rows[split:] or rows[-1:]))
    both = (rows[:split] or rows[:1]) + (rows[split:] or rows[-1:])
    users = load_pickapic([b, a], problems=[])  # shards in the other order, too
    assert _content(users) == _expected(both)


PROMPTS = st.text(st.characters(blacklist_categories=["Cs"]), min_size=1, max_size=30).filter(lambda t: t.strip())


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("img")
    for i in range(4):
        random_image(i).save(folder / f"i{i}.png")
    return folder


def _write(folder, rows, fmt):
    if fmt == "jsonl":  # as the picker writes: UTF-8, no ASCII escapes, one object per \n line
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                                            encoding="utf-8", newline="")
    else:
        with (folder / "pairs.csv").open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["prompt", "chosen", "rejected", "user_id"])
            writer.writeheader()
            writer.writerows(rows)


@SETTINGS
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
@given(prompts=st.lists(PROMPTS, min_size=1, max_size=4, unique=True), seed=st.integers(0, 2**16))
@example(prompts=["a\u2028b", 'x, "y"\n\r z\u0085', " \u2029x ", "caf\u00e9 \U0001f600,"], seed=1)
def test_pair_files_round_trip_any_text_in_any_line_order(tmp_path_factory, image_folder, fmt, prompts, seed):
    """Any prompt text (commas, quotes, \\n, \\r, U+2028, U+0085, emoji) written by the standard writers reads back
    exactly, and shuffling the lines gives the same pairs."""
    rows = [{"prompt": p, "chosen": f"i{i % 2}.png", "rejected": f"i{2 + i % 2}.png", "user_id": f"u{i % 2}"}
            for i, p in enumerate(prompts)]
    shuffled = list(rows)
    random.Random(seed).shuffle(shuffled)
    got = []
    for these in (rows, shuffled):
        folder = tmp_path_factory.mktemp("pairs")
        for f in image_folder.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        _write(folder, these, fmt)
        pairs = load_pair_folder(folder)
        assert [(p.prompt, p.chosen.path.name, p.user_id) for p in pairs] == \
            [(r["prompt"], r["chosen"], r["user_id"]) for r in these]  # file order, each text intact
        got.append({(p.user_id, p.prompt, p.chosen.raw_bytes(), p.rejected.raw_bytes()) for p in pairs})
    assert got[0] == got[1]


@SETTINGS
@given(order=st.permutations(range(3)), reverse=st.booleans())
def test_a_repeat_or_reversal_in_a_pair_file_is_refused_in_any_order(tmp_path_factory, image_folder, order, reverse):
    rows = [{"prompt": "p", "chosen": "i0.png", "rejected": "i1.png"},
            {"prompt": "p", "chosen": "i2.png", "rejected": "i3.png"},
            {"prompt": "p", "chosen": "i1.png" if reverse else "i0.png", "rejected": "i0.png" if reverse else "i1.png"}]
    folder = tmp_path_factory.mktemp("pairs")
    for f in image_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    _write(folder, [rows[i] for i in order], "jsonl")
    lines = sorted(order.index(i) + 1 for i in (0, 2))
    word = "reverses" if reverse else "repeats"
    with pytest.raises(PairError, match=rf"line {lines[1]} {word} pairs\.jsonl line {lines[0]} "):
        load_pair_folder(folder)
