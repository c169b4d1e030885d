// PPD Preference Picker, browser side (plain JavaScript on the ComfyUI frontend's extension API, no build step).
// The node sends "ppd-picker-show" for each pair and blocks until this page (or any script) answers through
// POST /ppd/picker/choose; "ppd-picker-done" closes a question answered or cancelled anywhere.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const questions = []; // open questions, oldest first; the first one is on screen
let overlay = null;

function viewUrl(img) {
  const q = new URLSearchParams({ filename: img.filename, subfolder: img.subfolder, type: img.type });
  return api.apiURL(`/view?${q}`);
}

function waitText(seconds) {
  return seconds < 120 ? `${Math.round(seconds)} s` : seconds < 7200 ? `${Math.round(seconds / 60)} min`
    : `${Math.round(seconds / 3600)} h`;
}

function el(tag, props = {}, ...children) {
  const node = Object.assign(document.createElement(tag), props);
  node.append(...children);
  return node;
}

const STYLE = `
#ppd-picker { position: fixed; inset: 0; z-index: 10000; background: rgba(0,0,0,.6); display: flex;
  align-items: center; justify-content: center; font: 14px sans-serif; }
#ppd-picker .panel { background: var(--comfy-menu-bg, #202020); color: var(--fg-color, #ddd);
  border: 1px solid var(--border-color, #444); border-radius: 8px; padding: 16px 20px; max-width: 92vw; }
#ppd-picker h3 { margin: 0 0 4px; font-size: 16px; }
#ppd-picker .prompt { opacity: .8; margin-bottom: 12px; max-width: 80vw; white-space: pre-wrap; }
#ppd-picker .pair { display: flex; gap: 16px; justify-content: center; }
#ppd-picker figure { margin: 0; display: flex; flex-direction: column; align-items: center; gap: 8px; }
#ppd-picker img { max-width: 40vw; max-height: 58vh; min-width: 256px; object-fit: contain; cursor: pointer;
  border: 2px solid transparent; border-radius: 4px; background: #111; }
#ppd-picker img:hover { border-color: var(--p-primary-color, #4a9eff); }
#ppd-picker button { font: inherit; padding: 6px 14px; border-radius: 4px; cursor: pointer;
  border: 1px solid var(--border-color, #555); background: var(--comfy-input-bg, #333); color: inherit; }
#ppd-picker .row { display: flex; gap: 8px; justify-content: space-between; align-items: center; margin-top: 12px; }
#ppd-picker .note { opacity: .7; font-size: 12px; }
#ppd-picker .confidence { margin: -4px 0 12px; max-width: 80vw; font-size: 13px; }
#ppd-picker .confidence.low { color: #fc6; }
#ppd-picker .error { color: #f77; }
`;

async function answer(q, choice) {
  const res = await api.fetchApi("/ppd/picker/choose", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ request_id: q.request_id, choice }),
  });
  if (!res.ok) {
    const msg = (await res.json().catch(() => ({}))).error || res.statusText;
    overlay?.querySelector(".error")?.replaceChildren(`Could not save the choice: ${msg}`);
    if (res.status !== 404) return; // 404: already answered or cancelled elsewhere, so drop it
  }
  drop(q.request_id);
}

function render() {
  overlay?.remove();
  overlay = null;
  const q = questions[0];
  if (!q) return;
  const side = (key, label) => {
    const img = el("img", { src: viewUrl(q[key]), alt: `candidate ${label}`, title: `Prefer ${label}` });
    img.dataset.ppdImage = label;
    img.onclick = () => answer(q, label);
    const button = el("button", { textContent: `${label} is better (${label === "A" ? 1 : 2})` });
    button.dataset.ppdChoice = label;
    button.onclick = () => answer(q, label);
    return el("figure", {}, img, button);
  };
  const skip = el("button", { textContent: "Skip (S)", title: "Save nothing for this pair" });
  skip.dataset.ppdChoice = "skip";
  skip.onclick = () => answer(q, "skip");
  const cancel = el("button", { textContent: "Cancel run", title: "Stop this prompt, like the queue's Cancel" });
  cancel.dataset.ppdChoice = "cancel";
  cancel.onclick = () => api.fetchApi("/interrupt", { method: "POST" });
  const more = questions.length > 1 ? ` · ${questions.length - 1} more waiting` : "";
  overlay = el("div", { id: "ppd-picker" },
    el("div", { className: "panel" },
      el("h3", { textContent: `Which one do you prefer? (pair ${q.index} of ${q.total})${more}` }),
      el("div", { className: "prompt", textContent: q.prompt }),
      // how many more pairs to pick: the connected embedding's confidence, counted down by the node
      ...(q.confidence ? [el("div", { className: `confidence${/: LOW\b/.test(q.confidence) ? " low" : ""}`,
        textContent: q.confidence })] : []),
      el("div", { className: "pair" }, side("a", "A"), side("b", "B")),
      el("div", { className: "row" },
        el("span", { className: "note",
          textContent: `Saved to input/${q.pair_set}/ · ${q.pairs_in_set} pair(s) so far` +
            (q.timeout_s ? ` · the run stops if no choice comes within ${waitText(q.timeout_s)}` : "") }),
        el("span", { className: "error" }),
        el("span", {}, skip, " ", cancel))));
  overlay.dataset.requestId = q.request_id;
  document.body.append(overlay);
}

function drop(requestId) {
  const i = questions.findIndex((q) => q.request_id === requestId);
  if (i < 0) return;
  questions.splice(i, 1);
  if (i === 0) render();
}

function add(q) {
  if (questions.some((x) => x.request_id === q.request_id)) return;
  questions.push(q);
  if (questions.length === 1) render();
  else overlay?.querySelector("h3")?.replaceChildren(
    `Which one do you prefer? (pair ${questions[0].index} of ${questions[0].total}) · ` +
    `${questions.length - 1} more waiting`);
}

async function syncPending() {
  // questions opened while this tab was closed or disconnected
  const res = await api.fetchApi("/ppd/picker/pending");
  if (!res.ok) return;
  const open = await res.json();
  questions.splice(0, questions.length, ...open);
  render();
}

function onKey(e) {
  const q = questions[0];
  if (!q || e.ctrlKey || e.metaKey || e.altKey || e.target?.closest?.("input, textarea")) return;
  const choice = { 1: "A", 2: "B", s: "skip", S: "skip" }[e.key];
  if (!choice) return;
  e.preventDefault();
  e.stopPropagation();
  answer(q, choice);
}

app.registerExtension({
  name: "ppd.PreferencePicker",
  async setup() {
    document.head.append(el("style", { textContent: STYLE }));
    api.addEventListener("ppd-picker-show", (e) => add(e.detail));
    api.addEventListener("ppd-picker-done", (e) => drop(e.detail.request_id));
    api.addEventListener("reconnected", syncPending);
    window.addEventListener("keydown", onKey, true);
    await syncPending();
  },
});
