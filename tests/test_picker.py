"""The Preference Picker's ComfyUI-free logic: the pair-set writer (read back by the real pair loader), the open
questions and their answers across threads, pair layout and set names. The browser and server side run in
tests/comfyui/test_comfyui_browser.py."""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path

import pytest
from helpers import random_image

from ppd_train.pair_writer import append_pair, count_pairs
from ppd_train.pairs import PairError, load_pair_folder

API = json.loads((Path(__file__).parent / "node_api.json").read_text())


def picker(pack):
    return importlib.import_module(f"{pack.__name__}.nodes.picker_nodes")


def test_appended_pairs_read_back_through_the_pair_loader(tmp_path):
    folder = tmp_path / "my_pairs"
    a, b = random_image(1, (32, 24)), random_image(2, (32, 24))
    assert append_pair(folder, "a red fox", a, b) == 1
    assert append_pair(folder, "ein Fuchs im Schnee", b, a) == 2
    pairs = load_pair_folder(folder)
    assert [p.prompt for p in pairs] == ["a red fox", "ein Fuchs im Schnee"]
    assert pairs[0].chosen.load().tobytes() == a.tobytes() and pairs[0].rejected.load().tobytes() == b.tobytes()
    assert pairs[1].chosen.load().tobytes() == b.tobytes()
    assert pairs[0].user_id == "my_pairs" and count_pairs(folder) == 2
    assert sorted(p.name for p in folder.glob("*.png")) == [
        "pair_00001_chosen.png", "pair_00001_rejected.png", "pair_00002_chosen.png", "pair_00002_rejected.png"]
    assert not list(folder.glob(".pairs.*.tmp"))


def test_nothing_is_overwritten_and_hand_edits_survive(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    random_image(9).save(folder / "pair_00001_chosen.png")  # copied in by hand, not written by the picker
    random_image(8).save(folder / "mine_rejected.png")
    (folder / "pairs.jsonl").write_text('{"prompt": "mine", "chosen": "pair_00001_chosen.png", '
                                        '"rejected": "mine_rejected.png"}')  # no final newline
    before = (folder / "pair_00001_chosen.png").read_bytes()
    assert append_pair(folder, "new", random_image(1), random_image(2)) == 2
    assert (folder / "pair_00001_chosen.png").read_bytes() == before
    assert [p.prompt for p in load_pair_folder(folder)] == ["mine", "new"]


def test_concurrent_appends_lose_nothing(tmp_path):
    folder = tmp_path / "busy"
    images = [random_image(i, (16, 16)) for i in range(2)]

    def work(k):
        for i in range(5):
            append_pair(folder, f"t{k} p{i}", *images)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    pairs = load_pair_folder(folder)
    assert len(pairs) == 15 and len({p.chosen.path for p in pairs} | {p.rejected.path for p in pairs}) == 30


def test_a_csv_set_is_not_hidden_by_a_new_jsonl(tmp_path):
    (tmp_path / "pairs.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(PairError, match="pairs.csv"):
        append_pair(tmp_path, "x", random_image(1), random_image(2))
    assert not (tmp_path / "pairs.jsonl").exists() and not list(tmp_path.glob("*.png"))


def test_each_question_gets_its_own_answer_across_threads(pack):
    m = picker(pack)
    pending = m.PendingChoices()
    first, second = pending.open({"index": 1}), pending.open({"index": 2})
    assert first.payload["request_id"] != second.payload["request_id"] and len(pending.pending()) == 2
    answers = {}

    def wait(request):
        answers[request.payload["index"]] = pending.wait(request, lambda: None, poll=0.01)

    threads = [threading.Thread(target=wait, args=(r,)) for r in (first, second)]
    for t in threads:
        t.start()
    pending.answer(second.payload["request_id"], "B")
    pending.answer(first.payload["request_id"], "skip")
    for t in threads:
        t.join(5)
    assert answers == {1: "skip", 2: "B"} and pending.pending() == []
    with pytest.raises(KeyError, match="already answered"):
        pending.answer(first.payload["request_id"], "A")
    with pytest.raises(ValueError, match="A, B, skip"):
        pending.answer(pending.open({}).payload["request_id"], "C")


def test_cancel_ends_the_wait_and_closes_the_question(pack):
    m = picker(pack)
    pending = m.PendingChoices()
    request = pending.open({})
    calls = []

    class Interrupted(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        pending.wait(request, check, poll=0.001)
    assert pending.pending() == []
    with pytest.raises(KeyError):  # a late click answers nothing
        pending.answer(request.payload["request_id"], "A")


def test_pair_layout(pack):
    m = picker(pack)
    PairError = m.PairError  # the pack's copy of the class (loaded as ppd_pack.ppd_train)
    assert m.pair_indices(2, None) == [(0, 1)] and m.pair_indices(4, None) == [(0, 1), (2, 3)]
    assert m.pair_indices(3, 3) == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(PairError, match="even number"):
        m.pair_indices(3, None)
    with pytest.raises(PairError, match="same batch size"):
        m.pair_indices(2, 1)


def test_pair_sets_stay_inside_the_input_folder(pack, tmp_path):
    m = picker(pack)
    errors = importlib.import_module(f"{pack.__name__}.ppd_train.errors")
    assert m.resolve_pair_set(" my_pairs ", tmp_path) == tmp_path / "my_pairs"
    assert m.resolve_pair_set("anna\\portraits", tmp_path) == tmp_path / "anna" / "portraits"
    for bad in ("", "  ", "../outside", "a/../../x", ".hidden", "/etc", "a/./.git"):
        with pytest.raises(errors.PPDError, match="empty|hidden|outside"):
            m.resolve_pair_set(bad, tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(m.PairError, match="is a file"):
        m.resolve_pair_set("file.txt", tmp_path)


def test_picker_inputs_are_pinned(pack):
    cls = importlib.import_module(f"{pack.__name__}.nodes").NODE_CLASS_MAPPINGS["PPDPreferencePicker"]
    spec = cls.INPUT_TYPES()
    assert [*spec["required"], *spec["optional"]] == API["PPDPreferencePicker"]["inputs"]
    assert all(opts[0].get("tooltip") for section in ("required", "optional") for _, *opts in spec[section].values())
    assert cls.OUTPUT_NODE and cls.IS_CHANGED() != cls.IS_CHANGED()  # NaN: every run asks again


def test_routes_register_only_on_a_running_server(pack):
    routes = importlib.import_module(f"{pack.__name__}.nodes.picker_routes")
    assert routes.register() is False  # no ComfyUI server in this process: nothing to add, nothing imported


def test_chosen_images_of_two_sizes_make_one_batch(pack):
    import torch

    m = picker(pack)
    a, b = torch.rand(1, 8, 12, 3), torch.rand(1, 16, 24, 3)
    out = m.batch_images([a, b])
    assert out.shape == (2, 8, 12, 3) and torch.equal(out[0], a[0])
