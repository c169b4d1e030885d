"""Plot the JSON written by the benchmarks: one panel per benchmark, ratios against the targets of docs/performance.md.

    python benchmarks/plot.py docs/results --out docs/performance.svg

Arguments are JSON files or folders of them; each file names its benchmark in its "benchmark" field.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the file-only backend)

PANELS = ("sampler_overhead", "dpo_step", "embedding_throughput", "training_scaling")


def load(paths: list[str]) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    for p in paths:
        files = sorted(Path(p).glob("*.json")) if Path(p).is_dir() else [Path(p)]
        for f in files:
            result = json.loads(f.read_text())
            if isinstance(result, list):  # not a benchmark's output (the world sweep writes a list of worlds)
                continue
            name = result.get("benchmark")
            if name is None:
                raise SystemExit(f"{f} has no 'benchmark' field: it was not written by a script in benchmarks/.")
            result["file"] = f.name
            panel = "sampler_overhead" if name == "comfyui_sampler_overhead" else name
            found.setdefault(panel, []).append(result)
    return found


def where(r: dict) -> str:
    return f"{r.get('kind', '?')}, {r.get('device', '?')}"


def sampler(ax, results: list[dict]) -> None:
    for r in results:
        path = "ComfyUI" if r["benchmark"] == "comfyui_sampler_overhead" else "diffusers"
        tokens = [row["tokens"] for row in r["rows"]]
        ax.plot(tokens, [row["ppd_ms"] / row["base_ms"] for row in r["rows"]], "o-", label=f"{path}: {where(r)}")
    ax.axhline(1.10, ls="--", c="grey", lw=1)
    ax.axhline(1.03, ls=":", c="grey", lw=1)
    ax.text(1.0, 1.10, "reduced-width target ", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=7)
    ax.text(1.0, 1.03, "real-width target ", transform=ax.get_yaxis_transform(), ha="right", va="bottom", fontsize=7)
    ax.set(title="Sampler overhead (PPD / base, K_u V_u cached)", xlabel="user tokens", ylabel="time ratio")
    ax.legend(fontsize=7)


def dpo(ax, results: list[dict]) -> None:
    labels, memory, time = [], [], []
    for r in results:
        if "baseline" not in r:  # written before the adapters-disabled baseline (2026-11-23): other ratios
            continue
        for row in r["rows"]:
            if row["variant"] == "adapters-disabled":  # the baseline: 1.0 by definition
                continue
            what = "8-bit AdamW" if row["optimizer"] == "adamw8bit" else row["reference"]
            labels.append(f"{r.get('kind', '?')} {'ckpt' if row['checkpointing'] else 'no ckpt'}\n{what}")
            memory.append(row["peak_ratio"])
            time.append(row["time_ratio"])
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], memory, 0.4, label="peak memory")
    ax.bar([i + 0.2 for i in x], time, 0.4, label="step time")
    ax.axhline(0.85, ls="--", c="C0", lw=1)
    ax.axhline(1.0, ls="--", c="C1", lw=1)
    ax.set_xticks(list(x), labels, fontsize=6)
    ax.set(title="DPO step / adapters-disabled AdamW recipe (medians)", ylabel="ratio (memory target 0.85)")
    ax.legend(fontsize=7)


def embedding(ax, results: list[dict]) -> None:
    for r in results:
        for mode, style in (("direct", "o-"), ("cot", "s--")):
            rows = [x for x in r["rows"] if x["mode"] == mode]
            ax.plot([x["batch"] for x in rows], [x["users_per_s"] for x in rows], style,
                    label=f"{mode}: {r.get('vlm', '?')} VLM, {r.get('device', '?')}")
    ax.set_yscale("log")
    ax.set(title="VLM user embedding", xlabel="batch size", ylabel="users / s")
    ax.legend(fontsize=7)


def scaling(ax, results: list[dict]) -> None:
    for r in results:
        pairs = sorted(int(p) for p in r["seconds"])
        per_pair = [statistics.median(r["seconds"][str(p)]) / p for p in pairs]
        ax.plot(pairs, [v / per_pair[0] for v in per_pair], "o-", label=f"{r.get('kind', '?')}, batch {r['batch']}")
    ax.axhline(1.0, ls="--", c="grey", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 2)
    ax.set(title="Training: time per pair vs dataset size", xlabel="pairs", ylabel="time per pair / smallest")
    ax.legend(fontsize=7)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("inputs", nargs="+", help="benchmark JSON files or folders of them")
    ap.add_argument("--out", default="performance.svg")
    args = ap.parse_args()
    found = load(args.inputs)
    panels = [p for p in PANELS if p in found]
    if not panels:
        raise SystemExit("No benchmark results found in " + ", ".join(args.inputs))
    cols = min(2, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    draw = {"sampler_overhead": sampler, "dpo_step": dpo, "embedding_throughput": embedding,
            "training_scaling": scaling}
    for ax, name in zip(axes.flat, panels):
        draw[name](ax, found[name])
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(args.out, metadata={"Date": None})  # no timestamp, so an unchanged plot is an unchanged file
    print(f"{len(panels)} panels -> {args.out}")


if __name__ == "__main__":
    main()
