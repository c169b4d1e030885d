"""The Preference Picker's ComfyUI-free logic (``ppd_train.picker``, ``ppd_train.pair_writer``): what a click
writes (read back by the real pair loader), the open questions and their answers across threads, timeouts, pair layout,
pair set names, and what the ``/ppd/picker/choose`` route answers. The browser and server side run in
tests/comfyui/test_comfyui_browser.py and test_comfyui_server.py."""

from __future__ import annotations

import importlib
import json
import threading
from pathlib import Path

import pytest
from helpers import random_image

from ppd_train import picker as pure
from ppd_train.errors import PPDError
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
    with pytest.raises(PairError, match="holds a pairs.csv"):  # already when the prompt is queued
        pure.resolve_pair_set(tmp_path.name, tmp_path.parent)


def test_each_question_gets_its_own_answer_across_threads():
    pending = pure.PendingChoices()
    first, second = pending.open({"index": 1}), pending.open({"index": 2})
    assert first.payload["request_id"] != second.payload["request_id"] and len(pending.pending()) == 2
    answers = {}

    def wait(request):
        answers[request.payload["index"]] = pending.wait(request, lambda: None, timeout=60, poll=0.01)

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


def test_cancel_ends_the_wait_and_closes_the_question():
    pending = pure.PendingChoices()
    request = pending.open({})
    calls = []

    class Interrupted(Exception):
        pass

    def check():
        calls.append(1)
        if len(calls) == 3:
            raise Interrupted

    with pytest.raises(Interrupted):
        pending.wait(request, check, timeout=60, poll=0.001)
    assert pending.pending() == []
    with pytest.raises(KeyError):  # a late click answers nothing
        pending.answer(request.payload["request_id"], "A")


def test_pair_layout():
    m = pure
    assert m.pair_indices(2, None) == [(0, 1)] and m.pair_indices(4, None) == [(0, 1), (2, 3)]
    assert m.pair_indices(3, 3) == [(0, 0), (1, 1), (2, 2)]
    with pytest.raises(PairError, match="even number"):
        m.pair_indices(3, None)
    with pytest.raises(PairError, match="same batch size"):
        m.pair_indices(2, 1)


def test_pair_sets_stay_inside_the_input_folder(tmp_path):
    assert pure.resolve_pair_set(" my_pairs ", tmp_path) == (tmp_path / "my_pairs", "my_pairs")
    assert pure.resolve_pair_set("anna\\portraits", tmp_path) == (tmp_path / "anna" / "portraits", "anna/portraits")
    for bad in ("", "  ", "../outside", "a/../../x", ".hidden", "/etc", "a/./.git", "a/..", "/"):
        with pytest.raises(PairError, match="empty|hidden|outside"):
            pure.resolve_pair_set(bad, tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(PairError, match="is a file"):
        pure.resolve_pair_set("file.txt", tmp_path)


def test_picker_inputs_are_pinned(pack):
    cls = importlib.import_module(f"{pack.__name__}.nodes").NODE_CLASS_MAPPINGS["PPDPreferencePicker"]
    spec = cls.INPUT_TYPES()
    assert [*spec["required"], *spec["optional"]] == API["PPDPreferencePicker"]["inputs"]
    assert all(opts[0].get("tooltip") for section in ("required", "optional") for _, *opts in spec[section].values())
    assert cls.OUTPUT_NODE and cls.IS_CHANGED() != cls.IS_CHANGED()  # NaN: every run asks again
    assert cls.RETURN_NAMES == ("chosen", "pair_count", "status")  # outputs only appended


def test_routes_register_only_on_a_running_server(pack):
    routes = importlib.import_module(f"{pack.__name__}.nodes.picker_routes")
    assert routes.register() is False  # no ComfyUI server in this process: nothing to add, nothing imported


def test_chosen_images_of_two_sizes_make_one_batch(pack):
    import torch

    m = picker(pack)
    a, b = torch.rand(1, 8, 12, 3), torch.rand(1, 16, 24, 3)
    out = m.batch_images([a, b])
    assert out.shape == (2, 8, 12, 3) and torch.equal(out[0], a[0])


# ------------------------------------------------------------------------------------- a click -> the pair written
def _solid(rgb, size=(24, 16)):
    from PIL import Image

    return Image.new("RGB", size, rgb)


RED, BLUE, GREEN, GREY = (220, 30, 30), (30, 30, 220), (30, 200, 30), (128, 128, 128)


def _prefer(colour, log=None):
    """A user who always clicks the side showing ``colour`` (and skips pairs where neither shows it)."""
    def ask(k, total, a, b):
        if log is not None:
            log.append((k, total, a.getpixel((0, 0)), b.getpixel((0, 0))))
        return "A" if a.getpixel((0, 0)) == colour else "B" if b.getpixel((0, 0)) == colour else "skip"
    return ask


def _written(folder):
    return [(p.prompt, p.chosen.load().getpixel((0, 0)), p.rejected.load().getpixel((0, 0)))
            for p in load_pair_folder(folder)]


def test_the_clicked_image_is_the_chosen_one_whatever_side_it_was_shown_on(tmp_path):
    """images_b connected: the red image is clicked, shown once as A and once as B; it is written as chosen both times,
    and the node's output points at it."""
    a, b = [_solid(RED), _solid(BLUE), _solid(GREY)], [_solid(GREEN), _solid(RED), _solid(BLUE)]
    shown: list = []
    picks = pure.collect(tmp_path / "set", "a cat", a, b, _prefer(RED, shown))
    assert shown == [(0, 3, RED, GREEN), (1, 3, BLUE, RED), (2, 3, GREY, BLUE)]  # A[i] shown as A, B[i] as B
    assert _written(tmp_path / "set") == [("a cat", RED, GREEN), ("a cat", RED, BLUE)]  # pair 2 skipped
    assert picks == [pure.Pick(0, "A", 0), pure.Pick(1, "B", 1)]
    assert [(a if p.side == "A" else b)[p.index].getpixel((0, 0)) for p in picks] == [RED, RED]


def test_the_clicked_image_is_the_chosen_one_in_a_single_batch(tmp_path):
    """images_b not connected: pairs are 0|1 and 2|3 of one batch; the B side is the second image of each pair."""
    batch = [_solid(BLUE), _solid(RED), _solid(RED), _solid(GREEN)]
    picks = pure.collect(tmp_path / "set", "p", batch, None, _prefer(RED))
    assert _written(tmp_path / "set") == [("p", RED, BLUE), ("p", RED, GREEN)]
    assert picks == [pure.Pick(0, "B", 1), pure.Pick(1, "A", 2)]
    assert all(batch[p.index].getpixel((0, 0)) == RED for p in picks)


def test_decide_maps_a_click_to_chosen_and_rejected():
    assert pure.decide("A", "shown as A", "shown as B") == ("shown as A", "shown as B")
    assert pure.decide("B", "shown as A", "shown as B") == ("shown as B", "shown as A")
    assert pure.decide("skip", "x", "y") is None
    with pytest.raises(ValueError, match="A, B, skip"):
        pure.decide("a", "x", "y")


def test_skip_writes_nothing(tmp_path):
    folder = tmp_path / "set"
    assert pure.collect(folder, "p", [_solid(RED)], [_solid(BLUE)], lambda *_: "skip") == []
    assert not folder.exists() and count_pairs(folder) == 0


def test_cancel_or_timeout_writes_nothing_for_that_pair_and_keeps_earlier_ones(tmp_path):
    class Cancelled(Exception):
        pass

    answers = iter(["B"])

    def ask(k, total, a, b):
        answer = next(answers, None)
        if answer is None:
            raise Cancelled
        return answer

    folder = tmp_path / "set"
    with pytest.raises(Cancelled):
        pure.collect(folder, "p", [_solid(RED), _solid(GREEN), _solid(GREY)],
                     [_solid(BLUE), _solid(RED), _solid(GREEN)], ask)
    assert _written(folder) == [("p", BLUE, RED)]  # the first pair, answered before the cancel
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "pair_00001_chosen.png", "pair_00001_rejected.png", "pairs.jsonl"]


# ------------------------------------------------------------------------------------------ how many more pairs
LOW = {"confidence": 0.3, "n_pairs": 4, "dims": 4, "low_confidence": True, "pairs_needed": 14}


def test_the_picker_counts_down_from_the_embeddings_pairs_needed():
    # the embedder measured 0.30 from 4 pairs: about 14 in all would do; the picker counts the pairs the set holds now
    meta = {"confidence": LOW}
    assert "pick about 10 more (about 14 in all)" in pure.pick_more(4, meta)
    assert "pick about 5 more (about 14 in all)" in pure.pick_more(9, meta)
    assert pure.pick_more(9, meta).startswith("pair confidence 0.30 from 4 pairs: LOW")
    for have in (14, 20):  # enough pairs now: embed again, nothing more to pick
        text = pure.pick_more(have, meta)
        assert f"about 14 in all would do and you have {have}: embed again from all of them (the Pair Loader's " \
               "num_pairs)" in text and "pick about" not in text
    assert pure.pick_more(6, {"confidence": {**LOW, "low_confidence": False, "confidence": 0.72}}) == \
        "pair confidence 0.72 from 4 pairs (ok)"
    assert "pick many more" in pure.pick_more(6, {"confidence": {**LOW, "pairs_needed": None}})
    # an embedding from more pairs than the set holds is not this set's: said, not hidden
    assert "made from 4 pairs, more than this set holds" in pure.pick_more(2, meta)
    assert "more than this set holds" not in pure.pick_more(4, meta)
    assert pure.pick_more(3, {"n_pairs": 4}) == "pair confidence: not measured (an embedding made before this version)"
    assert pure.pick_more(3, None) is None  # no embedding connected: the picker never guesses a confidence
    assert "is not a table" in pure.pick_more(3, {"confidence": 0.3})  # a damaged file: said, no traceback


def test_the_status_output_names_the_set_and_what_to_do():
    assert pure.status_text("anna/portraits", 9, {"confidence": LOW}) == (
        "input/anna/portraits: 9 pairs. Pair confidence 0.30 from 4 pairs: LOW - these pairs say too little about "
        "your taste; pick about 5 more (about 14 in all) with the Preference Picker, then embed again or tune the "
        "user.")
    bare = pure.status_text("my_pairs", 1, None)
    assert bare.startswith("input/my_pairs: 1 pair. ") and "connect that embedding to the picker's user_embedding" \
        in bare


def test_the_count_goes_down_with_each_pick_from_a_real_embedding_file(tmp_path):
    """An embedding whose confidence the real measure computed, saved and loaded as the node gets it; the picker's
    question shows one pair fewer to pick after each pick written to disk, and a skip changes nothing."""
    import torch

    from ppd_train.confidence import pair_confidence
    from ppd_train.embedding import UserEmbedding

    g = torch.Generator().manual_seed(0)
    conf = pair_confidence(torch.randn(4, 3, generator=g) @ torch.randn(3, 32, generator=g))
    assert conf["low_confidence"] and conf["pairs_needed"] is not None and conf["pairs_needed"] > 8
    UserEmbedding(torch.zeros(2, 8), "test:embedder", {"confidence": conf}).save(tmp_path / "u.safetensors")
    meta = UserEmbedding.load(tmp_path / "u.safetensors").meta
    folder = tmp_path / "set"
    for i in range(4):
        append_pair(folder, "p", random_image(i), random_image(i + 10))
    shown = []

    def ask(k, total, a, b):
        shown.append(pure.pick_more(count_pairs(folder), meta))  # what the node sends with each question
        return ["A", "skip", "B"][k]

    pure.collect(folder, "p", [_solid(RED)] * 3, [_solid(BLUE)] * 3, ask)
    need = conf["pairs_needed"]
    assert [f"pick about {need - have} more (about {need} in all)" in text for text, have in zip(shown, (4, 5, 5))] \
        == [True] * 3
    assert pure.status_text("set", count_pairs(folder), meta).startswith(
        f"input/set: 6 pairs. Pair confidence {conf['confidence']:.2f} from 4 pairs: LOW")


# ------------------------------------------------------------------------------------------------- waiting limits
class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += 1.0  # every look at the clock is a second later
        return self.now


def test_a_question_nobody_answers_times_out_with_a_clear_message():
    pending = pure.PendingChoices()
    request = pending.open({"index": 2, "total": 3, "pair_set": "my_pairs"})
    with pytest.raises(pure.PickerTimeout) as e:
        pending.wait(request, lambda: None, timeout=30, poll=0.0001, clock=_Clock())
    message = str(e.value)
    assert "No choice came within 30 seconds for pair 2 of 3" in message and "'my_pairs'" in message
    assert "browser tab" in message and "POST /ppd/picker/choose" in message and "timeout_s" in message
    assert pending.pending() == []
    with pytest.raises(KeyError):  # a click after the timeout answers nothing
        pending.answer(request.payload["request_id"], "A")


def test_an_answer_before_the_timeout_is_taken():
    pending = pure.PendingChoices()
    request = pending.open({})
    clock = _Clock()
    ticks = []

    def check():
        ticks.append(1)
        if len(ticks) == 3:
            pending.answer(request.payload["request_id"], "B")

    assert pending.wait(request, check, timeout=10, poll=0.0001, clock=clock) == "B" and clock.now < 10


def test_an_answer_that_arrives_as_the_time_runs_out_is_kept():
    """The click was accepted (the route said 200), so it must not be lost to a timeout raised a moment later."""
    pending = pure.PendingChoices()
    request = pending.open({})
    clock = _Clock()

    def check():
        if clock.now == 3.0:  # the last look before the deadline (1 + 3): answered right then
            pending.answer(request.payload["request_id"], "A")

    assert pending.wait(request, check, timeout=3, poll=0.0001, clock=clock) == "A" and clock.now == 4.0


def test_timeout_values(pack):
    assert pure.check_timeout(10) == 10.0 and pure.check_timeout(7 * 24 * 3600) == 7 * 24 * 3600
    for bad in (0, -5, 9.5, float("nan"), float("inf"), True, "60", None, 10**9):
        with pytest.raises(PPDError, match="timeout_s must be a number of seconds from 10 to 604800"):
            pure.check_timeout(bad)
    cls = importlib.import_module(f"{pack.__name__}.nodes").NODE_CLASS_MAPPINGS["PPDPreferencePicker"]
    _, opts = cls.INPUT_TYPES()["optional"]["timeout_s"]
    assert (opts["min"], opts["max"], opts["default"]) == (10, 7 * 24 * 3600, 600)


# ------------------------------------------------------------------------------------------------------ the route
def _open_question(pending):
    return pending.open({"index": 1})


def test_the_route_answers_a_question():
    pending = pure.PendingChoices()
    request = _open_question(pending)
    body = json.dumps({"request_id": request.payload["request_id"], "choice": "B"}).encode()
    assert pure.choose_response(pending, body) == (200, {"ok": True})
    assert request.event.is_set() and request.choice == "B" and pending.pending() == []


def test_route_errors_never_echo_the_input():
    pending = pure.PendingChoices()
    _open_question(pending)
    huge = "f" * (10 * 2**20)
    cases = {
        json.dumps({"request_id": huge, "choice": "A"}): 400,  # a 10 MiB id (the server cut it at 64 KiB)
        json.dumps({"request_id": "0" * 32, "choice": "A"}): 404,  # well formed, not open
        json.dumps({"request_id": "0" * 32, "choice": "C" * 5000}): 400,
        json.dumps({"request_id": "Z" * 5000, "choice": "A"}): 400,
        json.dumps(["x" * 5000]): 400,
        json.dumps({"request_id": 12345678901234567890, "choice": "A"}): 400,
        "{not json " + "x" * 5000: 400,
        "[" * 60000: 400,  # nesting deeper than the parser's recursion: still a plain 400
        b"\xff\xfe" + b"x" * 5000: 400,
    }
    for body, status in cases.items():
        raw = body if isinstance(body, bytes) else body.encode()
        got, answer = pure.choose_response(pending, raw if len(raw) <= pure.MAX_BODY_BYTES else raw[:60000])
        assert got == status, (got, answer)
        text = json.dumps(answer)
        assert len(text) < 300 and "xxxxx" not in text and "fffff" not in text and "CCCCC" not in text \
            and "ZZZZZ" not in text and "00000" not in text, text
    assert len(pending.pending()) == 1  # nothing was answered


def test_the_route_refuses_a_body_over_the_limit():
    pending = pure.PendingChoices()
    request = _open_question(pending)
    ok = json.dumps({"request_id": request.payload["request_id"], "choice": "A", "pad": "x" * 70000}).encode()
    assert pure.choose_response(pending, None)[0] == 413  # the route stopped reading at the limit
    status, answer = pure.choose_response(pending, ok)
    assert status == 413 and "65536 bytes" in answer["error"] and request.choice is None
    assert pure.choose_response(pending, ok[:0] + json.dumps(
        {"request_id": request.payload["request_id"], "choice": "A"}).encode())[0] == 200


# -------------------------------------------------------------------------------------------- pair set names
def test_long_and_deep_pair_set_names_are_refused_clearly(tmp_path):
    with pytest.raises(PairError) as e:
        pure.resolve_pair_set("x" * 300, tmp_path)
    assert "longer than 100 bytes" in str(e.value) and "Errno" not in str(e.value) and "x" * 100 not in str(e.value)
    with pytest.raises(PairError, match="400 folders deep; a pair set is one folder, or one folder inside another"):
        pure.resolve_pair_set("/".join(["d"] * 400), tmp_path)
    with pytest.raises(PairError, match="3 folders deep"):
        pure.resolve_pair_set("a/b/c", tmp_path)
    with pytest.raises(PairError, match="control character"):
        pure.resolve_pair_set("my\npairs", tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing created by a refused name
    assert pure.resolve_pair_set("é" * 50, tmp_path)[1] == "é" * 50  # 100 bytes: the longest allowed


def test_an_existing_folder_of_images_does_not_become_a_pair_set(tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    random_image(1).save(photos / "holiday.png")
    with pytest.raises(PairError, match=r"photos.*already exists and holds other files \(holiday.png\) but no "
                                        r"pairs.jsonl, so it is not a pair set"):
        pure.resolve_pair_set("photos", tmp_path)
    (tmp_path / "empty").mkdir()
    assert pure.resolve_pair_set("empty", tmp_path)[0] == tmp_path / "empty"  # an empty folder is a new set
    append_pair(tmp_path / "set", "p", random_image(1), random_image(2))
    assert pure.resolve_pair_set("set", tmp_path)[0] == tmp_path / "set"  # an existing pair set
    leftover = tmp_path / "cut"  # a run stopped between the images and the row
    append_pair(leftover, "p", random_image(1), random_image(2))
    (leftover / "pairs.jsonl").unlink()
    assert pure.resolve_pair_set("cut", tmp_path)[0] == leftover


def test_an_absolute_path_inside_the_input_folder_is_that_pair_set(tmp_path):
    assert pure.resolve_pair_set(str(tmp_path / "anna" / "portraits"), tmp_path) == (
        tmp_path / "anna" / "portraits", "anna/portraits")
    with pytest.raises(PairError, match="absolute path outside ComfyUI's input folder"):
        pure.resolve_pair_set(str(tmp_path.parent / "elsewhere"), tmp_path)


def test_a_symlink_inside_the_input_folder_is_never_written_through(tmp_path):
    root, outside = tmp_path / "input", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "linked").symlink_to(outside, target_is_directory=True)
    (root / "real").mkdir()
    (root / "real" / "sub").symlink_to(outside, target_is_directory=True)
    for name in ("linked", "linked/new", "real/sub", str(root / "linked")):
        with pytest.raises(PairError, match="is a symbolic link; the picker writes only into real folders"):
            pure.resolve_pair_set(name, root)
    with pytest.raises(PairError, match="symbolic link"):  # the writer refuses too, whoever calls it
        append_pair(root / "linked", "p", random_image(1), random_image(2))
    (root / "set").mkdir()
    (root / "set" / "pairs.jsonl").symlink_to(outside / "pairs.jsonl")
    with pytest.raises(PairError, match="symbolic link"):
        append_pair(root / "set", "p", random_image(1), random_image(2))
    assert list(outside.iterdir()) == []
    # the input folder itself may be a link (the user keeps it elsewhere): that is where they want the files
    (tmp_path / "input_link").symlink_to(root, target_is_directory=True)
    folder, _ = pure.resolve_pair_set("mine", tmp_path / "input_link")
    assert folder == root / "mine"


@pytest.mark.parametrize("umask", [0o002, 0o077])
def test_picker_files_honour_the_umask(tmp_path, umask):
    import os
    import stat

    old = os.umask(umask)
    try:
        append_pair(tmp_path / "set", "p", random_image(1), random_image(2))
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "set").iterdir()}
    assert modes == {name: 0o666 & ~umask for name in (".pairs.lock", "pairs.jsonl", "pair_00001_chosen.png",
                                                       "pair_00001_rejected.png")}


def test_a_prompt_with_unicode_line_breaks_stays_one_row(tmp_path):
    prompts = ["a fox\u2028in snow", "next\x85line", "para\u2029graph", "tab\tand\nnewline"]
    for prompt in prompts:
        append_pair(tmp_path, prompt, random_image(1), random_image(2))
    assert count_pairs(tmp_path) == 4
    assert [p.prompt for p in load_pair_folder(tmp_path)] == prompts
    assert len((tmp_path / "pairs.jsonl").read_bytes().split(b"\n")) == 5  # four rows and the final newline
    assert not any(ch in (tmp_path / "pairs.jsonl").read_text() for ch in "\u2028\u2029\x85")


def test_the_route_stops_reading_a_body_at_the_limit():
    import asyncio

    read = []

    async def chunks(n, size=16384):
        for _ in range(n):
            read.append(size)
            yield b"x" * size

    assert asyncio.run(pure.read_body(None, chunks(4))) == b"x" * 65536  # exactly the limit: read whole
    read.clear()
    assert asyncio.run(pure.read_body(None, chunks(3200))) is None  # a streamed 50 MB body, no length given
    assert sum(read) == 65536 + 16384  # one chunk past the limit, and no further
    read.clear()
    assert asyncio.run(pure.read_body(50 * 2**20, chunks(3200))) is None and read == []  # declared too long
    assert asyncio.run(pure.read_body(10, chunks(0))) == b""


# ---------------------------------------------------------------------------------- boundaries (docs/mutation.md)
def test_a_skipped_pair_does_not_end_the_round(tmp_path):
    a, b = [_solid(GREY), _solid(RED)], [_solid(BLUE), _solid(GREEN)]
    picks = pure.collect(tmp_path / "set", "p", a, b, _prefer(RED))  # pair 0 shows no red: skipped
    assert picks == [pure.Pick(1, "A", 1)] and _written(tmp_path / "set") == [("p", RED, GREEN)]


def test_images_with_alpha_are_written_as_rgb(tmp_path):
    from PIL import Image

    append_pair(tmp_path, "p", Image.new("RGBA", (8, 8), (200, 10, 10, 128)), Image.new("L", (8, 8), 7))
    for name in ("pair_00001_chosen.png", "pair_00001_rejected.png"):
        with Image.open(tmp_path / name) as img:
            assert img.mode == "RGB"


def test_pair_set_refusals_quote_the_name_cut_at_60_characters(tmp_path):
    with pytest.raises(PairError, match=r"^pair_set '\.hidden' names a hidden folder"):
        pure.resolve_pair_set(".hidden", tmp_path)
    long = "a" * 30 + "\t" + "a" * 29  # 60 characters: quoted whole
    with pytest.raises(PairError, match=r"^pair_set 'a{30}\\ta{29}' holds a control character"):
        pure.resolve_pair_set(long, tmp_path)
    longer = "b\t" + "b" * 59  # 61: cut to 60 and marked
    with pytest.raises(PairError, match=r"^pair_set 'b\\tb{58}\.\.\.' holds a control character"):
        pure.resolve_pair_set(longer, tmp_path)
    with pytest.raises(PairError, match="control character"):
        pure.resolve_pair_set("my\x7fpairs", tmp_path)  # DEL
    assert pure.resolve_pair_set("my pairs", tmp_path) == (tmp_path / "my pairs", "my pairs")  # a space is plain
    assert pure.resolve_pair_set("~x!", tmp_path)[1] == "~x!"


def test_the_wait_times_out_exactly_at_its_deadline():
    pending = pure.PendingChoices()
    request = pending.open({})
    times = iter([0.0] + [5.0] * 3)  # the deadline is read at 0; every later look is exactly at 0 + 5
    looks = []

    def check():
        looks.append(1)
        if len(looks) > 2:
            raise RuntimeError("the deadline passed without a timeout")

    with pytest.raises(pure.PickerTimeout):
        pending.wait(request, check, timeout=5, poll=0.0001, clock=lambda: next(times))
    assert len(looks) == 1


def test_a_body_of_exactly_the_limit_is_read_and_answered():
    import asyncio

    pending = pure.PendingChoices()
    request = _open_question(pending)
    body = json.dumps({"request_id": request.payload["request_id"], "choice": "A"}).encode()
    body += b" " * (pure.MAX_BODY_BYTES - len(body))  # JSON allows trailing blanks

    async def one():
        yield body

    assert asyncio.run(pure.read_body(pure.MAX_BODY_BYTES, one())) == body
    assert pure.choose_response(pending, body) == (200, {"ok": True}) and request.choice == "A"


def test_route_errors_are_json_with_an_error_field():
    pending = pure.PendingChoices()
    _open_question(pending)
    usage = pure.USAGE
    assert pure.choose_response(pending, b"{") == (400, {"error": f"the body is not JSON; {usage}"})
    assert pure.choose_response(pending, b"[]") == (400, {"error": usage})
    assert pure.choose_response(pending, b'{"request_id": "x", "choice": "A"}') == (400, {
        "error": "request_id must be the 32 hexadecimal digits of an open question, as GET /ppd/picker/pending "
                 "lists them"})
    status, answer = pure.choose_response(pending, json.dumps({"request_id": "0" * 32, "choice": "A"}).encode())
    assert status == 404 and answer["error"].startswith("no open preference question has this request_id")
    assert pure.choose_response(pending, json.dumps({"request_id": "0" * 32, "choice": "C"}).encode()) == (
        400, {"error": "choice must be one of A, B, skip"})


def test_a_linked_lock_file_is_refused_and_a_new_nested_set_is_created(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / ".pairs.lock").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(PairError, match=r"\.pairs\.lock is a symbolic link"):
        append_pair(folder, "p", _solid(RED), _solid(BLUE))
    assert append_pair(tmp_path / "anna" / "portraits", "p", _solid(RED), _solid(BLUE)) == 1  # two levels, new


def test_pairs_jsonl_keeps_a_prompts_letters_readable_in_utf8(tmp_path):
    """An artist opens pairs.jsonl in an editor: accented and non-Latin letters are written as themselves (UTF-8),
    not as \\u escapes; only the characters some readers take as line breaks are escaped."""
    append_pair(tmp_path, "café 東京\u2028x", _solid(RED), _solid(BLUE), user_id="zoë")
    line = (tmp_path / "pairs.jsonl").read_bytes()
    assert line == ('{"prompt": "café 東京\\u2028x", "chosen": "pair_00001_chosen.png", '
                    '"rejected": "pair_00001_rejected.png", "user_id": "zoë"}\n').encode()


def test_a_writer_whose_locale_is_not_utf8_keeps_earlier_rows(tmp_path):
    """pairs.jsonl is UTF-8 whatever the system's locale (Windows' is cp1252): a picker in a process whose locale is
    ASCII (C, no UTF-8 mode) reads the earlier rows as UTF-8 and appends its own."""
    import os
    import subprocess
    import sys

    import ppd_train

    append_pair(tmp_path, "café", _solid(RED), _solid(BLUE))
    code = ("import locale, sys; from PIL import Image; from ppd_train.pair_writer import append_pair; "
            "assert locale.getpreferredencoding(False).lower().replace('-', '') != 'utf8', 'a UTF-8 locale'; "
            "append_pair(sys.argv[1], 'Stra\\xdfe', Image.new('RGB', (8, 8), 'red'), Image.new('RGB', (8, 8), 'blue'))")
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(Path(ppd_train.__file__).parents[1])}
    child = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True)
    assert child.returncode == 0, child.stderr
    assert [p.prompt for p in load_pair_folder(tmp_path)] == ["café", "Straße"]
