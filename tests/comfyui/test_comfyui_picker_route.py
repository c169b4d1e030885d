"""The Preference Picker's limits on a real ComfyUI server: what ``/ppd/picker/choose`` refuses (and never echoes),
pair set names refused when a prompt is queued, and the timeout that frees the queue when no tab answers."""

from __future__ import annotations

import http.client
import json
import os

import pytest
from comfyui_support import execution_error


def _raw_post(server, path: str, body: bytes, chunked: bool = False) -> tuple[int, bytes]:
    """POST ``body`` as it is (``chunked``: without a Content-Length, as a stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        if chunked:
            chunks = (body[i:i + 65536] for i in range(0, len(body), 65536))
            conn.request("POST", path, body=chunks, headers={"Content-Type": "application/json"},
                         encode_chunked=True)
        else:
            conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    except (BrokenPipeError, ConnectionResetError):  # the server may answer and close before all was sent
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def _picker(pair_set: str, timeout_s: int | None = None) -> dict:
    image = {"class_type": "EmptyImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}}
    pick = {"images_a": ["red", 0], "images_b": ["blue", 0], "prompt": "red or blue", "pair_set": pair_set}
    if timeout_s is not None:
        pick["timeout_s"] = timeout_s
    return {"red": {**image, "inputs": {**image["inputs"], "color": 0xFF0000}},
            "blue": {**image, "inputs": {**image["inputs"], "color": 0x0000FF}},
            "pick": {"class_type": "PPDPreferencePicker", "inputs": pick}}


def test_the_route_refuses_big_bodies_and_never_echoes_input(comfy_server):
    for chunked in (False, True):  # with a Content-Length, and streamed without one
        status, body = _raw_post(comfy_server, "/ppd/picker/choose", b'{"request_id": "' + b"a" * (50 * 2**20)
                                 + b'", "choice": "A"}', chunked)
        assert status == 413 and len(body) < 300 and b"aaaa" not in body, (chunked, status, body[:300])
    huge_id = "f" * (10 * 2**20)
    status, body = _raw_post(comfy_server, "/ppd/picker/choose",
                             json.dumps({"request_id": huge_id, "choice": "A"}).encode())
    assert status == 413 and len(body) < 300 and b"ffff" not in body
    for request_id, choice in (("e" * 60000, "A"), ("0" * 32, "A"), ("0" * 32, "D" * 1000)):
        status, body = _raw_post(comfy_server, "/ppd/picker/choose",
                                 json.dumps({"request_id": request_id, "choice": choice}).encode())
        assert status in (400, 404) and len(body) < 300 and b"eeee" not in body and b"0000" not in body \
            and b"DDDD" not in body, (status, body[:300])
        assert "error" in json.loads(body)
    status, body = _raw_post(comfy_server, "/ppd/picker/choose", b"[" * 60000)
    assert status == 400 and b"not JSON" in body
    assert comfy_server.get("/system_stats")  # still serving


def test_bad_pair_set_names_are_refused_when_queued(comfy_server):
    input_dir = comfy_server.base / "input"
    (input_dir / "photos").mkdir(parents=True, exist_ok=True)
    (input_dir / "photos" / "holiday.png").write_bytes(b"not even a png")
    outside = comfy_server.base / "outside_input"
    outside.mkdir(exist_ok=True)
    if not (input_dir / "linked").is_symlink():
        (input_dir / "linked").symlink_to(outside, target_is_directory=True)
    cases = {"/".join(["deep"] * 400): "400 folders deep", "x" * 300: "longer than 100 bytes",
             "photos": "not a pair set", "linked/set": "symbolic link", "../outside": "climbs out"}
    for name, words in cases.items():
        status, answer = comfy_server.post("/prompt", {"prompt": _picker(name)})
        errors = json.dumps(answer.get("node_errors"))
        assert status == 400 and words in errors and "Errno" not in errors, (name[:50], errors[:500])
    assert not (input_dir / "deep").exists() and list(outside.iterdir()) == []
    assert sorted(p.name for p in (input_dir / "photos").iterdir()) == ["holiday.png"]


def test_with_no_tab_open_the_picker_times_out_and_the_queue_moves_on(comfy_server):
    status, answer = comfy_server.post("/prompt", {"prompt": _picker("timed_out", timeout_s=10)})
    assert status == 200, answer
    entry = comfy_server.wait(answer["prompt_id"], 120)
    message = execution_error(entry)
    assert entry["status"]["status_str"] == "error" and "No choice came within 10 seconds for pair 1 of 1" in message
    assert "browser tab" in message and "/ppd/picker/choose" in message, message
    assert comfy_server.get("/ppd/picker/pending") == []
    assert not (comfy_server.base / "input" / "timed_out" / "pairs.jsonl").exists()
    # the next prompt runs, answered by a script; its pair set is given as an absolute path inside input/
    folder = comfy_server.base / "input" / "after_timeout"
    status, answer = comfy_server.post("/prompt", {"prompt": _picker(os.fspath(folder), timeout_s=60)})
    assert status == 200, answer
    import time

    deadline = time.time() + 60
    while not (pending := comfy_server.get("/ppd/picker/pending")) and time.time() < deadline:
        time.sleep(0.3)
    (question,) = pending
    assert question["pair_set"] == "after_timeout"
    assert comfy_server.post("/ppd/picker/choose", {"request_id": question["request_id"], "choice": "B"})[0] == 200
    entry = comfy_server.wait(answer["prompt_id"], 60)
    assert entry["status"]["status_str"] == "success", execution_error(entry)
    (row,) = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    from PIL import Image

    with Image.open(folder / row["chosen"]) as chosen:  # B (blue) was chosen
        assert chosen.getpixel((0, 0)) == (0, 0, 255)


@pytest.fixture(autouse=True)
def _no_question_left(comfy_server):
    yield
    assert comfy_server.get("/ppd/picker/pending") == []
