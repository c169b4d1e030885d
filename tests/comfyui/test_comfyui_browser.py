"""ComfyUI's real web frontend in headless Chromium (Selenium) against a real ComfyUI with this pack.

Shipped workflows: each loads through the frontend with every node type known, no node covering another, the pair
loader's seed not changing per queue, and the frontend's own ``graphToPrompt()`` output refused only for the model
files this server lacks. The Preference Picker: the shipped collect workflow (its model loaders swapped for the
fixture pack's tiny Stable Cascade) is queued with the Run button, B is clicked in the picker, and the pair set on
disk is checked; Cancel ends the wait cleanly; queued prompts each get their own question.

Needs Debian's ``chromium`` and ``chromium-driver`` and ``selenium`` (docs/testing-comfyui.md); skipped, saying
so, without them. Screenshots go to each test's tmp_path; ``PPD_SCREENSHOT_DIR=docs/img`` also writes the README's
picker screenshot (``picker.png``) there.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

WORKFLOWS = sorted((Path(__file__).resolve().parents[2] / "workflows").glob("*.json"))
COLLECT = next(w for w in WORKFLOWS if w.stem == "ppd_collect_preferences")
# inputs that pick a file from a folder: the only ones a shipped workflow may fail validation on, on a bare server
FILE_INPUTS = {"ckpt_name", "vae_name", "adapter_name", "embedding", "model", "source"}
SET = "browser_picks"


def _chromium() -> tuple[str, str]:
    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("browser tests need selenium: pip install selenium (docs/testing-comfyui.md)")
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    if not browser or not driver:
        pytest.skip("browser tests need Chromium and its driver: apt-get install chromium chromium-driver "
                    "(docs/testing-comfyui.md)")
    return browser, driver


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory, comfy):
    """A ComfyUI of its own (so other tests' placeholder files cannot change what validates), tiny Stable Cascade."""
    from comfyui_support import ComfyServer

    _chromium()
    base = tmp_path_factory.mktemp("comfyui_ui")
    repo = Path(__file__).resolve().parents[2]
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "ppd").symlink_to(repo, target_is_directory=True)
    (base / "custom_nodes" / "ppd_test_fixtures").symlink_to(repo / "tests" / "comfyui" / "fixture_pack",
                                                              target_is_directory=True)
    (base / "models" / "diffusion_models").mkdir(parents=True)
    comfy["fixtures"].write_tiny_cascade(str(base / "models" / "diffusion_models"))
    _write_tiny_sdxl_assets(base / "models", comfy)
    extra = base / "extra_model_paths.yaml"
    extra.write_text("{}\n")
    server = ComfyServer(base, extra)
    yield server
    server.stop()


SDXL_ADAPTER, SDXL_USER = "tiny_ppd_sdxl.safetensors", "sdxl_user.safetensors"


def _write_tiny_sdxl_assets(models: Path, comfy) -> None:
    """The fixture pack's tiny SDXL, an adapter for it and a user embedding, in the server's default folders."""
    import importlib

    import torch
    from comfyui_support import tiny_adapter

    adapter_mod = importlib.import_module("ppd_pack.ppd_train.adapter")
    embedding_mod = importlib.import_module("ppd_pack.ppd_train.embedding")
    comfy["fixtures"].write_tiny_sdxl(str(models / "diffusion_models"))
    info = importlib.import_module("ppd_pack.nodes.sdxl_patch").sdxl_of(comfy["fixtures"].tiny_sdxl())[1]
    (models / "ppd_adapters").mkdir(parents=True)
    adapter_mod.save_adapter(tiny_adapter(comfy, 24, 5, "test", info=info), models / "ppd_adapters" / SDXL_ADAPTER)
    (models / "ppd_embeddings").mkdir(parents=True)
    embedding_mod.UserEmbedding(torch.randn(5, 24, generator=torch.Generator().manual_seed(4)), "test").save(
        models / "ppd_embeddings" / SDXL_USER)


@pytest.fixture(scope="module")
def page(ui_server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = _chromium()
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(driver), options=options)
    d.set_script_timeout(60)
    try:
        _open_frontend(d, ui_server.url)
        yield d
    finally:
        d.quit()


def _open_frontend(d, url: str) -> None:
    d.get(url)
    _until(lambda: d.execute_script(
        "return !!(window.app && app.graph && window.LiteGraph && "
        "LiteGraph.registered_node_types['PPDPreferencePicker'] && app.extensionManager)"), 90, "frontend load")
    time.sleep(1)
    _close_dialogs(d)


def _close_dialogs(page) -> None:
    """Close what the frontend opens over the canvas (the template browser on a first start, ...)."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.keys import Keys

    for _ in range(5):
        titles = page.execute_script(
            "return [...document.querySelectorAll('.p-dialog')].map(d => d.innerText.slice(0, 80))")
        if not titles:
            return
        ActionChains(page).send_keys(Keys.ESCAPE).perform()
        time.sleep(0.3)
    raise AssertionError(f"a dialog stays open over the canvas: {titles}")


def _until(condition, timeout: float, what: str, poll: float = 0.25):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(poll)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


def _load(page, workflow: dict) -> list[dict]:
    """Load a UI-format workflow the way the frontend does; the nodes as the frontend lays them out."""
    return page.execute_async_script("""
        const [wf, done] = arguments;
        (async () => {
          app.extensionManager.toast?.removeAll?.();  // each workflow is judged on its own alerts
          document.querySelectorAll('.p-toast-close-button').forEach(b => b.click());
          await new Promise(r => setTimeout(r, 300));
          await app.loadGraphData(wf);
          app.canvas.draw(true, true);
          await new Promise(r => setTimeout(r, 300));  // let the frontend render any alert it raised
          const alerts = [...document.querySelectorAll('.p-toast-message')].map(t => t.innerText)
            .filter(t => /invalid workflow|schema/i.test(t));
          if (alerts.length) return 'ALERT ' + alerts.join(' | ').slice(0, 1500);
          return app.graph._nodes.map(n => ({id: n.id, type: n.type, title: n.title,
            known: n.type in LiteGraph.registered_node_types, rect: Array.from(n.boundingRect),
            min: Array.from(n.computeSize()), widgets: (n.widgets || []).map(w => w.name)}));
        })().then(done, e => done('ERROR ' + e));""", workflow)


def _overlaps(nodes: list[dict]) -> list[str]:
    """Pairs of nodes whose boxes (title bar included, grown to what their widgets need) intersect."""
    title = 30  # LiteGraph.NODE_TITLE_HEIGHT, already inside boundingRect's height
    boxes = []
    for n in nodes:
        x, y, w, h = n["rect"]
        boxes.append((n, x, y, x + max(w, n["min"][0]), y + max(h, n["min"][1] + title)))
    return [f"{a['type']}#{a['id']} and {b['type']}#{b['id']}"
            for i, (a, ax0, ay0, ax1, ay1) in enumerate(boxes) for (b, bx0, by0, bx1, by1) in boxes[i + 1:]
            if min(ax1, bx1) > max(ax0, bx0) and min(ay1, by1) > max(ay0, by0)]


def _screenshot(page, path: Path, name: str, publish: bool = False) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    out = path / f"{name}.png"
    page.save_screenshot(str(out))
    if publish and os.environ.get("PPD_SCREENSHOT_DIR"):
        Path(os.environ["PPD_SCREENSHOT_DIR"]).mkdir(parents=True, exist_ok=True)
        shutil.copy(out, Path(os.environ["PPD_SCREENSHOT_DIR"]) / out.name)
    return out


@pytest.mark.parametrize("workflow", WORKFLOWS, ids=[w.stem for w in WORKFLOWS])
def test_shipped_workflow_loads_looks_right_and_queues(page, ui_server, workflow, tmp_path):
    nodes = _load(page, json.loads(workflow.read_text()))
    assert isinstance(nodes, list), nodes
    assert [n["type"] for n in nodes if not n["known"]] == [], "node types the frontend does not know"
    assert _overlaps(nodes) == [], "nodes cover each other when the workflow is opened"
    for n in nodes:
        # a seed that changed on every queue would re-run the VLM / the tuning
        if n["type"] in ("PPDPreferencePairLoader", "PPDTuneUserEmbedding"):
            assert "control_after_generate" not in n["widgets"], n["widgets"]
    page.execute_script("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    time.sleep(0.5)
    _screenshot(page, tmp_path, f"workflow_{workflow.stem}")

    prompt = page.execute_async_script("const done = arguments[0]; app.graphToPrompt().then(p => done(p.output))")
    status, answer = ui_server.post("/prompt", {"prompt": prompt})
    assert status == 400, f"expected a refusal for missing model files, got {status}: {json.dumps(answer)[:1500]}"
    for node_id, err in answer["node_errors"].items():
        for e in err["errors"]:
            name = e.get("extra_info", {}).get("input_name")
            assert e["type"] == "value_not_in_list" and name in FILE_INPUTS, f"{err['class_type']}#{node_id}: {e}"


# ------------------------------------------------------------------------------------------------------ the picker
# What the graph-editing scripts below share: the graph, a node's output targets, setting widgets of every node of a
# type, and Save Image swapped for the Preference Picker on the same image input.
GRAPH_JS = """
const g = app.graph;
const targets = (node, slot) => (node.outputs[slot].links || []).map(id => g.links[id]).filter(Boolean)
  .map(l => [g.getNodeById(l.target_id), l.target_slot]);
const set = (type, values) => g._nodes.filter(n => n.type === type).forEach(n =>
  Object.entries(values).forEach(([k, v]) => { n.widgets.find(w => w.name === k).value = v; }));
const saveToPicker = () => {
  const save = g._nodes.find(n => n.type === 'SaveImage');
  const picker = LiteGraph.createNode('PPDPreferencePicker');
  g.add(picker);
  picker.pos = [...save.pos];
  g.getNodeById(g.links[save.inputs[0].link].origin_id).connect(0, picker, 0);
  g.remove(save);
};
"""


SWAP_TO_TINY_MODELS = GRAPH_JS + """
// The shipped collect workflow with its model nodes swapped for the fixture pack's tiny Stable Cascade (same graph
// otherwise), small and fast: 256 px, 3 + 2 steps.
const [setName] = arguments;
const tiny = LiteGraph.createNode('PPDTestTinyCascade');
g.add(tiny);
tiny.widgets[0].value = 'tiny_stage_c.safetensors';
for (const ckpt of g._nodes.filter(n => n.type === 'CheckpointLoaderSimple')) {
  if (!ckpt.widgets[0].value.includes('stage_b')) tiny.pos = [...ckpt.pos];
  const stage = ckpt.widgets[0].value.includes('stage_b') ? 1 : 0;
  for (const [n, slot] of targets(ckpt, 0)) tiny.connect(stage, n, slot);
  for (const [n, slot] of targets(ckpt, 2)) tiny.connect(2, n, slot);
}
for (const enc of g._nodes.filter(n => n.type === 'CLIPTextEncode')) {
  const cond = LiteGraph.createNode('PPDTestTextConditioning');
  g.add(cond);
  cond.pos = [...enc.pos];
  cond.size = [...enc.size];
  const text = enc.inputs.find(i => i.name === 'text');
  cond.widgets[0].value = text?.link != null ? g.getNodeById(g.links[text.link].origin_id).widgets[0].value
                                             : enc.widgets[0].value;
  for (const [n, slot] of targets(enc, 0)) cond.connect(0, n, slot);
}
for (const n of g._nodes.filter(n => ['CheckpointLoaderSimple', 'CLIPTextEncode'].includes(n.type))) g.remove(n);
set('StableCascade_EmptyLatentImage', {width: 256, height: 256});
for (const ks of g._nodes.filter(n => n.type === 'KSampler')) ks.widgets.find(w => w.name === 'steps').value = 3;
set('PPDPreferencePicker', {pair_set: setName});
app.canvas.draw(true, true);
return g._nodes.find(n => n.type === 'PrimitiveStringMultiline').widgets[0].value;
"""


@pytest.fixture(scope="module")
def collect_graph(page):
    assert isinstance(_load(page, json.loads(COLLECT.read_text())), list)
    prompt_text = page.execute_script(SWAP_TO_TINY_MODELS, SET)
    page.execute_script("app.extensionManager.command.execute('Comfy.Canvas.FitView')")
    return prompt_text


def _run(page, ui_server) -> str:
    """Press the frontend's Run button; the id of the prompt it queued."""
    from selenium.webdriver.common.by import By

    before = set(ui_server.get("/history"))
    queued = {item[1] for key in ("queue_running", "queue_pending") for item in ui_server.get("/queue")[key]}
    _close_dialogs(page)
    page.find_element(By.XPATH, "//button[normalize-space(.)='Run']").click()

    def new_prompt():
        q = ui_server.get("/queue")
        ids = [item[1] for key in ("queue_running", "queue_pending") for item in q[key]]
        return next((i for i in ids + list(ui_server.get("/history")) if i not in queued and i not in before), None)

    return _until(new_prompt, 30, "the Run button to queue a prompt")


def _dialog(page, timeout: float = 120) -> dict:
    """The picker dialog once it shows a question: its request id and the preview images' file names."""
    return _until(lambda: page.execute_script("""
        const d = document.getElementById('ppd-picker');
        if (!d) return null;
        const name = s => new URL(d.querySelector(`img[data-ppd-image=${s}]`).src).searchParams.get('filename');
        return {request_id: d.dataset.requestId, a: name('A'), b: name('B'),
                title: d.querySelector('h3').textContent, prompt: d.querySelector('.prompt').textContent,
                note: d.querySelector('.note').textContent,
                confidence: d.querySelector('.confidence')?.textContent ?? null,
                low: !!d.querySelector('.confidence.low')};"""),
        timeout, "the Preference Picker dialog")


def _dialog_closed(page, request_id: str) -> None:
    _until(lambda: page.execute_script(
        "const d = document.getElementById('ppd-picker'); return !d || d.dataset.requestId !== arguments[0]",
        request_id), 30, "the picker dialog to close")


def _click(page, choice: str) -> None:
    from selenium.webdriver.common.by import By

    page.find_element(By.CSS_SELECTOR, f"#ppd-picker button[data-ppd-choice='{choice}']").click()


def _rows(ui_server) -> list[dict]:
    path = ui_server.base / "input" / SET / "pairs.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_pick_b_in_the_browser_appends_the_pair(page, ui_server, collect_graph, tmp_path):
    from PIL import Image

    pid = _run(page, ui_server)
    shown = _dialog(page)
    assert shown["prompt"] == collect_graph and "pair 1 of 1" in shown["title"]
    assert "the run stops if no choice comes within 10 min" in shown["note"]  # the node's default timeout_s
    assert shown["confidence"] is None  # the shipped workflow's profile loader is muted: no confidence to show
    time.sleep(0.5)  # let the images paint before the screenshot
    _screenshot(page, tmp_path, "picker", publish=True)
    _click(page, "B")
    entry = ui_server.wait(pid, 60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    _dialog_closed(page, shown["request_id"])

    (row,) = _rows(ui_server)
    assert row == {"prompt": collect_graph, "chosen": "pair_00001_chosen.png", "rejected": "pair_00001_rejected.png"}
    folder, temp = ui_server.base / "input" / SET, ui_server.base / "temp" / "ppd_picker"

    def pixels(p):
        with Image.open(p) as im:
            return im.convert("RGB").tobytes()

    assert pixels(folder / row["chosen"]) == pixels(temp / shown["b"])  # B was clicked: B is the chosen image
    assert pixels(folder / row["rejected"]) == pixels(temp / shown["a"]) != pixels(temp / shown["b"])
    outputs = entry["outputs"]
    assert any(out.get("text") == ["1"] for out in outputs.values()), outputs  # pair_count shown by PreviewAny
    status = [t for out in outputs.values() for t in out.get("text", []) if t.startswith(f"input/{SET}:")]
    assert status and status[0].startswith(f"input/{SET}: 1 pair. Do they say enough?"), outputs
    assert any(img["filename"] == shown["b"] for out in outputs.values() for img in out.get("images", []))
    from ppd_pack.ppd_train.pairs import load_pair_folder

    (pair,) = load_pair_folder(folder)
    assert pair.prompt == collect_graph and pair.chosen.load().size == (256, 256)


def test_cancel_ends_the_wait_cleanly(page, ui_server, collect_graph):
    pid = _run(page, ui_server)
    shown = _dialog(page)
    first_tab = page.current_window_handle
    page.switch_to.new_window("tab")  # a tab opened while the prompt waits shows the same question
    _open_frontend(page, ui_server.url)
    assert _dialog(page)["request_id"] == shown["request_id"]
    late_tab = page.current_window_handle
    page.switch_to.window(first_tab)
    _click(page, "cancel")
    entry = ui_server.wait(pid, 60)
    kinds = [kind for kind, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and "execution_error" not in kinds, entry["status"]
    _dialog_closed(page, shown["request_id"])
    page.switch_to.window(late_tab)  # ... and closes it when the question ends elsewhere
    _dialog_closed(page, shown["request_id"])
    page.close()
    page.switch_to.window(first_tab)
    assert ui_server.get("/ppd/picker/pending") == [] and len(_rows(ui_server)) == 1
    status, answer = ui_server.post("/ppd/picker/choose", {"request_id": shown["request_id"], "choice": "A"})
    assert status == 404 and "already answered, cancelled or timed out" in answer["error"]
    assert shown["request_id"] not in answer["error"]  # errors never repeat the input


def test_queued_prompts_each_get_their_own_choice(page, ui_server, collect_graph):
    from selenium.webdriver.common.action_chains import ActionChains

    first, second = _run(page, ui_server), _run(page, ui_server)
    q1 = _dialog(page)
    _click(page, "A")
    assert ui_server.wait(first, 60)["status"]["status_str"] == "success"
    def next_question():
        shown = _dialog(page)
        return shown if shown["request_id"] != q1["request_id"] else None

    q2 = _until(next_question, 120, "the second prompt's question")
    assert q2["a"] != q1["a"]
    ActionChains(page).send_keys("s").perform()  # keyboard: S skips
    entry = ui_server.wait(second, 60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    rows = _rows(ui_server)
    assert len(rows) == 2 and rows[1]["chosen"] == "pair_00002_chosen.png"  # the skip saved nothing
    _dialog_closed(page, q2["request_id"])
    assert ui_server.get("/ppd/picker/pending") == [] and not page.execute_script(
        "return !!document.getElementById('ppd-picker')")


def test_the_picker_counts_down_how_many_more_pairs_to_pick(page, ui_server, collect_graph, tmp_path):
    """The shipped workflow's muted profile loader unmuted (as its note says) with a saved embedding whose confidence
    the real measure computed: the dialog shows that confidence and how many more pairs to pick, counted from the
    pairs the set holds, and the status output has one fewer after the pick."""
    import torch
    from ppd_pack.ppd_train.confidence import pair_confidence
    from ppd_pack.ppd_train.embedding import UserEmbedding

    g = torch.Generator().manual_seed(0)
    conf = pair_confidence(torch.randn(4, 3, generator=g) @ torch.randn(3, 32, generator=g))
    have, need = len(_rows(ui_server)), conf["pairs_needed"]
    assert conf["low_confidence"] and need is not None and need > have + 1
    folder = ui_server.base / "models" / "ppd_embeddings" / "ppd"
    folder.mkdir(parents=True, exist_ok=True)
    UserEmbedding(torch.zeros(2, 8), "test:browser", {"confidence": conf}).save(folder / "browser_user.safetensors")
    page.execute_script("""
        const n = app.graph._nodes.find(n => n.type === 'PPDLoadUserEmbedding');
        n.mode = arguments[0]; n.widgets[0].value = arguments[1]; app.canvas.draw(true, true);""",
        0, "ppd/browser_user.safetensors")
    try:
        pid = _run(page, ui_server)
        shown = _dialog(page)
        head = f"pair confidence {conf['confidence']:.2f} from 4 pairs: LOW"
        assert shown["confidence"].startswith(head) and shown["low"], shown
        assert f"pick about {need - have} more (about {need} in all)" in shown["confidence"], shown
        # made from 4 pairs while the set holds fewer (the earlier tests' picks): said in the dialog
        assert ("made from 4 pairs, more than this set holds" in shown["confidence"]) is (have < 4), shown
        time.sleep(0.5)
        _screenshot(page, tmp_path, "picker_confidence")
        _click(page, "A")
        entry = ui_server.wait(pid, 60)
        assert entry["status"]["status_str"] == "success", entry["status"]
        (status,) = [t for out in entry["outputs"].values() for t in out.get("text", [])
                     if t.startswith(f"input/{SET}:")]
        assert status.startswith(f"input/{SET}: {have + 1} pair") and f". P{head[1:]}" in status and \
            f"pick about {need - have - 1} more (about {need} in all)" in status, status
    finally:
        page.execute_script("app.graph._nodes.find(n => n.type === 'PPDLoadUserEmbedding').mode = 2")


def _picker_prompt(pair_set: str) -> dict:
    """Two plain images (red vs blue) -> the picker, in API format: what a script would queue."""
    image = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 48, "batch_size": 1}}
    return {"red": {**image, "inputs": {**image["inputs"], "color": 0xFF0000}},
            "blue": {**image, "inputs": {**image["inputs"], "color": 0x0000FF}},
            "pick": {"class_type": "PPDPreferencePicker", "inputs": {
                "images_a": ["red", 0], "images_b": ["blue", 0], "prompt": "red or blue", "pair_set": pair_set}}}


def test_scripts_answer_through_the_route_and_sets_stay_inside_input(ui_server):
    for bad in ("../outside", "/tmp/x", ".hidden"):
        status, answer = ui_server.post("/prompt", {"prompt": _picker_prompt(bad)})
        assert status == 400 and "pair_set" in json.dumps(answer["node_errors"]), (bad, answer)
    assert not (ui_server.base / "outside").exists()

    status, answer = ui_server.post("/prompt", {"prompt": _picker_prompt("scripted/red_vs_blue")})
    assert status == 200, answer
    (question,) = _until(lambda: ui_server.get("/ppd/picker/pending"), 60, "the picker's question")
    assert (question["prompt"], question["index"], question["total"]) == ("red or blue", 1, 1)
    status, err = ui_server.post("/ppd/picker/choose", {"request_id": question["request_id"], "choice": "C"})
    assert status == 400 and "A, B, skip" in err["error"]
    assert ui_server.post("/ppd/picker/choose", {"request_id": question["request_id"], "choice": "A"})[0] == 200
    entry = ui_server.wait(answer["prompt_id"], 60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    from PIL import Image

    folder = ui_server.base / "input" / "scripted" / "red_vs_blue"
    (row,) = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    with Image.open(folder / row["chosen"]) as chosen, Image.open(folder / row["rejected"]) as rejected:
        assert chosen.getpixel((0, 0)) == (255, 0, 0) and rejected.getpixel((0, 0)) == (0, 0, 255)


def test_a_batch_without_images_b_is_asked_pair_by_pair(ui_server):
    prompt = _picker_prompt("scripted/batch")
    prompt["red"]["inputs"]["batch_size"] = 4  # pairs 1st|2nd and 3rd|4th
    del prompt["pick"]["inputs"]["images_b"]
    status, answer = ui_server.post("/prompt", {"prompt": prompt})
    assert status == 200, answer
    seen = []
    for choice in ("B", "skip"):
        (question,) = _until(lambda: [q for q in ui_server.get("/ppd/picker/pending")
                                      if q["request_id"] not in seen], 60, "the next pair")
        seen.append(question["request_id"])
        assert (question["index"], question["total"]) == (len(seen), 2)
        assert ui_server.post("/ppd/picker/choose", {"request_id": question["request_id"], "choice": choice})[0] == 200
    entry = ui_server.wait(answer["prompt_id"], 60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert len((ui_server.base / "input" / "scripted" / "batch" / "pairs.jsonl").read_text().splitlines()) == 1


# ------------------------------------------------------------------------------------------------ SDXL + the picker
SDXL = next(w for w in WORKFLOWS if w.stem == "ppd_sdxl_personalised")
SWAP_SDXL_TO_TINY_AND_PICK = GRAPH_JS + """
// The shipped SDXL workflow with Load Checkpoint swapped for the fixture pack's tiny SDXL (MODEL, VAE) and the text
// encoders for its SDXL-shaped conditioning, two 64 px candidates, and Save Image replaced by the Preference Picker.
const [setName, adapterName, userName] = arguments;
const replace = (old, type, outputs) => {
  const n = LiteGraph.createNode(type);
  g.add(n);
  n.pos = [...old.pos];
  for (const [from, to] of outputs) for (const [t, slot] of targets(old, from)) n.connect(to, t, slot);
  g.remove(old);
  return n;
};
const ckpt = g._nodes.find(n => n.type === 'CheckpointLoaderSimple');
replace(ckpt, 'PPDTestTinySDXL', [[0, 0], [2, 1]]).widgets[0].value = 'tiny_sdxl_unet.safetensors';
let prompt = null;
for (const enc of g._nodes.filter(n => n.type === 'CLIPTextEncode')) {
  const text = enc.widgets[0].value;
  prompt = prompt ?? text;  // the first encoder is the positive prompt
  replace(enc, 'PPDTestSDXLConditioning', [[0, 0]]).widgets[0].value = text;
}
set('EmptyLatentImage', {width: 64, height: 64, batch_size: 2});
set('KSampler', {steps: 3});
set('PPDAdapterLoader', {adapter_name: adapterName});
set('PPDLoadUserEmbedding', {embedding: userName});
saveToPicker();
set('PPDPreferencePicker', {pair_set: setName, prompt: prompt});
app.canvas.draw(true, true);
return prompt;
"""


def test_sdxl_workflow_with_the_picker_in_the_browser(page, ui_server):
    """The shipped SDXL workflow (Apply PPD Adapter before the stock KSampler), on the tiny SDXL, queued with the Run
    button: the picker shows the two SDXL candidates and the click on A is saved."""
    assert isinstance(_load(page, json.loads(SDXL.read_text())), list)
    prompt = page.execute_script(SWAP_SDXL_TO_TINY_AND_PICK, "sdxl_browser_picks", SDXL_ADAPTER, SDXL_USER)
    pid = _run(page, ui_server)
    shown = _dialog(page)
    assert shown["prompt"] == prompt and "pair 1 of 1" in shown["title"]
    _click(page, "A")
    entry = ui_server.wait(pid, 60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    _dialog_closed(page, shown["request_id"])
    folder = ui_server.base / "input" / "sdxl_browser_picks"
    (row,) = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    from PIL import Image

    with Image.open(folder / row["chosen"]) as chosen, Image.open(ui_server.base / "temp" / "ppd_picker" /
                                                                  shown["a"]) as a:
        assert row["prompt"] == prompt and chosen.size == (64, 64)
        assert chosen.convert("RGB").tobytes() == a.convert("RGB").tobytes()  # A was clicked: A is the chosen one


# ------------------------------------------------------------------------------------- SDXL: tune, sample, pick
SDXL_TUNE = next(w for w in WORKFLOWS if w.stem == "ppd_sdxl_tune_user_from_picks")
SWAP_SDXL_TUNE_TO_TINY_AND_PICK = GRAPH_JS + """
// The shipped SDXL tune workflow with Load Checkpoint swapped for the fixture pack's tiny SDXL (its MODEL, CLIP and VAE
// feed Tune User Embedding, the stock text encoders and VAE Decode as before), the pairs from a prepared set, a few
// tuning steps at 64 px, two 64 px candidates, and Save Image replaced by the Preference Picker on the same set.
const [setName, numPairs, adapterName, userName] = arguments;
const ckpt = g._nodes.find(n => n.type === 'CheckpointLoaderSimple');
const tiny = LiteGraph.createNode('PPDTestTinySDXL');
g.add(tiny);
tiny.pos = [...ckpt.pos];
for (const [from, to] of [[0, 0], [1, 2], [2, 1]]) {  // MODEL, CLIP, VAE
  for (const [t, slot] of targets(ckpt, from)) tiny.connect(to, t, slot);
}
g.remove(ckpt);
tiny.widgets[0].value = 'tiny_sdxl_unet.safetensors';
set('PPDPreferencePairLoader', {source: setName, num_pairs: numPairs});
set('PPDTuneUserEmbedding', {steps: 4, image_size: 64, lr: 0.1});
set('EmptyLatentImage', {width: 64, height: 64, batch_size: 2});
set('KSampler', {steps: 3});
set('PPDAdapterLoader', {adapter_name: adapterName});
set('PPDLoadUserEmbedding', {embedding: userName});
saveToPicker();
const prompt = g._nodes.find(n => n.type === 'CLIPTextEncode').widgets[0].value;
set('PPDPreferencePicker', {pair_set: setName, prompt: prompt});
app.canvas.draw(true, true);
return prompt;
"""


def test_sdxl_tune_workflow_with_the_picker_in_the_browser(page, ui_server):
    """The shipped SDXL tune workflow on the tiny SDXL (stock text encoders and VAE Decode on its CLIP and VAE),
    queued with the Run button: Tune User Embedding tunes on the set's pairs, the tuned user samples through Apply
    PPD Adapter and the stock KSampler, the picker shows the two candidates and the click on B joins the same set; the
    tuned embedding is saved."""
    from helpers import write_color_pairs

    folder = write_color_pairs(ui_server.base / "input" / "sdxl_tune_picks", 6, 64)
    assert isinstance(_load(page, json.loads(SDXL_TUNE.read_text())), list)
    prompt = page.execute_script(SWAP_SDXL_TUNE_TO_TINY_AND_PICK, "sdxl_tune_picks", 6, SDXL_ADAPTER, SDXL_USER)
    pid = _run(page, ui_server)
    shown = _dialog(page, timeout=300)  # tuning first: minutes on a loaded 2-core machine
    assert shown["prompt"] == prompt and "pair 1 of 1" in shown["title"]
    _click(page, "B")
    entry = ui_server.wait(pid, 300)
    assert entry["status"]["status_str"] == "success", entry["status"]
    _dialog_closed(page, shown["request_id"])
    rows = [json.loads(line) for line in (folder / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 7 and rows[-1]["prompt"] == prompt
    (report,) = entry["outputs"]["7"]["text"]  # the workflow's report preview
    assert report.startswith("Tuned") and "on 6 pairs" in report and "Held-out DPO loss" in report, report
    (saved,) = (ui_server.base / "models" / "ppd_embeddings" / "ppd").glob("tuned_sdxl_*.safetensors")
    assert saved.stat().st_size > 0
