"""A sweep over synthetic worlds with ONE recipe (``ppd-train demo --sweep FILE``): evidence that PPD personalises on
worlds nobody tuned for.

The sweep file (TOML or YAML) lists worlds; each may set only ``seed`` and ``world.*`` keys, so every world is trained
with the same recipe (the demo config with its ``--config`` / ``--set``)::

    [[worlds]]
    name = "k6-c6-u12"
    seed = 1
    world = { k_styles = 6, n_captions = 6, seen_users = 12, unseen_users = 6 }

Output under the sweep's folder: one demo folder per world, ``sweep.json``, ``sweep.md`` (the table) and ``sweep.png``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from .config import ConfigError, _read_file, from_dict, to_dict
from .errors import PPDError
from .safetensors_io import dumps_json
from .synthetic import DemoConfig, check_world, run_demo

ALLOWED = {"name", "seed", "world"}
COLUMNS = [("world", "{}"), ("seed", "{}"), ("K", "{}"), ("captions", "{}"), ("seen", "{}"), ("unseen", "{}"),
           ("pairs/user", "{}"), ("mix share", "{:.0%}"), ("seen win", "{:.0%}"), ("unseen win", "{:.0%}"),
           ("gain", "{:.2f}"), ("drift sd", "{:.2f}"), ("lowest user", "{:.0%}"), ("users < 50%", "{:.0%}"),
           ("monotone", "{}"), ("< 50%: pairs / adapter", "{}"), ("< 50% flagged", "{}"),
           ("< 50%: other draws win", "{}"), ("flagged", "{}"),
           ("step", "{}"), ("time s", "{:.0f}"), ("targets", "{}")]


def load_sweep(path: str | os.PathLike) -> list[tuple[str, dict]]:
    worlds = _read_file(path).get("worlds")
    if not isinstance(worlds, list) or not worlds:
        raise ConfigError(f"{path}: no worlds; write one [[worlds]] table per world (name, seed, world = {{...}}).")
    out, names = [], set()
    for i, entry in enumerate(worlds):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: worlds[{i}] must be a table.")
        extra = sorted(set(entry) - ALLOWED)
        if extra:
            raise ConfigError(f"{path}: worlds[{i}] sets {', '.join(extra)}; a sweep varies only seed and world.* "
                              "(one recipe for all worlds: set train.* with --config / --set instead).")
        name = str(entry.get("name") or f"world{i}")
        if name in names or not name.replace("-", "").replace("_", "").isalnum():
            raise ConfigError(f"{path}: worlds[{i}] name {name!r} must be unique and use only letters, digits, - _.")
        names.add(name)
        out.append((name, {k: v for k, v in entry.items() if k != "name"}))
    return out


def world_config(base: DemoConfig, change: dict, out_dir: Path) -> DemoConfig:
    merged = to_dict(base)
    merged["world"] = {**merged["world"], **change.get("world", {})}
    if "seed" in change:
        merged["seed"] = change["seed"]
    merged["out_dir"] = str(out_dir)
    return from_dict(DemoConfig, merged)


def _row(name: str, cfg: DemoConfig, m: dict) -> dict:
    w = cfg.world
    f = m.get("failures") or {}  # worlds run before the diagnosis existed have none
    return {"world": name, "seed": cfg.seed, "K": w.k_styles, "captions": w.n_captions, "seen": w.seen_users,
            "unseen": w.unseen_users, "pairs/user": w.pairs_per_user,
            "mix share": w.unseen_mixtures / max(1, w.unseen_users), "seen win": m["seen"]["win_rate"],
            "unseen win": m["unseen"]["win_rate"], "gain": m["all"]["reward_gain"], "drift sd": m["all"]["drift_sd"],
            "lowest user": m["all"]["min_win_rate"], "users < 50%": m["all"]["below_half"],
            "monotone": "yes" if m["interpolation"]["monotone"] else "NO",
            "< 50%: pairs / adapter": f"{f.get('pairs_say_too_little', '-')} / {f.get('adapter_wrong', '-')}",
            "< 50% flagged": f"{f.get('failing_flagged', '-')} of {f.get('below_half', '-')}",
            "< 50%: other draws win": f"{f.get('other_draws_win', '-')} of {f.get('below_half', '-')}",
            "flagged": f"{f.get('flagged', '-')} of {len(m['users'])}",
            "step": (m["selected"] or {}).get("step"),
            "time s": m["seconds"], "targets": "met" if not m["missed"] else "; ".join(m["missed"])}


def markdown(rows: list[dict]) -> str:
    head = "| " + " | ".join(c for c, _ in COLUMNS) + " |"
    lines = [head, "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append("| " + " | ".join(fmt.format(r[c]) for c, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _plot(rows: list[dict], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
    x = range(len(rows))
    names = [r["world"] for r in rows]
    ax1.plot(x, [r["seen win"] for r in rows], "o", label="seen users")
    ax1.plot(x, [r["unseen win"] for r in rows], "s", label="unseen users")
    ax1.plot(x, [r["lowest user"] for r in rows], "v", color="grey", label="lowest single user")
    ax1.axhline(0.9, color="tab:blue", lw=0.8, ls="--")
    ax1.axhline(0.8, color="tab:orange", lw=0.8, ls="--")
    ax1.set_xticks(list(x), names, rotation=45, ha="right", fontsize=8)
    ax1.set_ylim(0, 1.02)
    ax1.set_ylabel("win rate vs base Stage C")
    ax1.set_title("One recipe, many worlds (dashed: targets)")
    ax1.legend(fontsize=8)
    ax2.scatter([r["drift sd"] for r in rows], [r["gain"] for r in rows])
    for r in rows:
        ax2.annotate(r["world"], (r["drift sd"], r["gain"]), fontsize=7)
    ax2.set_xlabel("fidelity: drift off the data (sd)")
    ax2.set_ylabel("mean reward gain")
    ax2.set_title("Reward gain against drift off the data")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def run_sweep(base: DemoConfig, worlds: list[tuple[str, dict]], out_dir: str | os.PathLike, log=print,
              show_progress: bool = False) -> list[dict]:
    """Run every world with the base recipe. A world whose folder holds the metrics of a finished run with the same
    config is reported from them; one with a finished training run is evaluated again, not retrained."""
    out = Path(out_dir)
    configs = [world_config(base, change, out / name) for name, change in worlds]
    for (name, _), cfg in zip(worlds, configs):  # refuse a world that cannot run before hours go into the others
        try:
            check_world(cfg.world)
        except PPDError as e:
            raise PPDError(f"sweep world {name!r}: {e}") from None
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ((name, _), cfg) in enumerate(zip(worlds, configs)):
        log(f"[{i + 1}/{len(worlds)}] world {name}")
        done = out / name / "metrics.json"
        metrics = json.loads(done.read_text()) if done.is_file() else None
        if metrics is None or metrics.get("config") != to_dict(cfg):  # a finished world with this config is reused
            metrics = run_demo(cfg, log=lambda *a: None, show_progress=show_progress)
        rows.append(_row(name, cfg, metrics))
        r = rows[-1]
        log(f"    seen {r['seen win']:.0%}, unseen {r['unseen win']:.0%}, drift {r['drift sd']:.2f} sd, lowest user "
            f"{r['lowest user']:.0%}, {r['time s']:.0f} s: targets {r['targets']}")
    (out / "sweep.json").write_text(dumps_json(rows, sort_keys=False, indent=2))
    table = markdown(rows)
    (out / "sweep.md").write_text(table)
    log("\n" + table)
    if _plot(rows, out / "sweep.png"):
        log(f"plot: {out / 'sweep.png'}")
    met = sum(r["targets"] == "met" for r in rows)
    log(f"targets met on {met} of {len(rows)} worlds; table: {out / 'sweep.md'}")
    return rows
