"""The catalogue of bad inputs: the single list of what a user may get wrong, where, and what PPD answers.

Each case does the bad thing for real (real files, real loaders, the real CLI) and checks the answer. ``refused``
cases must raise (or exit non-zero) with a message holding ``message`` (``…`` stands for what varies); ``handled``
cases must come out right, as ``message`` says. docs/bad-inputs.md is rendered from this list (``python
tests/test_bad_inputs.py`` rewrites it) and a test keeps the two equal: add new cases here, never only in the doc.
"""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "bad-inputs.md"
REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Case:
    id: str
    input: str  # what was given, as a user would describe it
    where: str  # CLI, node or API
    outcome: str  # "refused" (a clear error) or "handled" (the right result, no error needed)
    message: str  # refused: the message, "…" where it varies; handled: what happens
    run: Callable[[Ctx], object]


class Ctx:
    """What a case may use: a fresh folder, the CLI with its output captured, the pack as ComfyUI loads it."""

    def __init__(self, tmp: Path, capsys, monkeypatch, files: Path, pack) -> None:
        self.tmp, self.capsys, self.monkeypatch, self.files, self.pack = tmp, capsys, monkeypatch, files, pack

    def cli(self, *argv: str) -> tuple[int, str]:
        from ppd_train.cli import main

        self.capsys.readouterr()
        try:
            rc = main(list(argv))
        except SystemExit as e:  # argparse: usage + the message, status 2
            rc = int(e.code or 0)
        out = self.capsys.readouterr()
        return rc, out.out + out.err

    def fit_args(self, out_dir: Path | None = None, *extra: str) -> list[str]:
        f = self.files
        sets = [f"stage_c={f / 'stage_c'}", f"data={f / 'data.safetensors'}", f"embeddings={f / 'users.safetensors'}",
                f"out_dir={out_dir or self.tmp / 'run'}", "max_steps=3", "batch_size=4", "lr=1e-2", "beta=100.0",
                "checkpoint_every=1", "tensorboard=false", *extra]
        return ["fit", "--quiet", *[a for s in sets for a in ("--set", s)]]

    def node(self, name: str):
        import importlib

        return importlib.import_module(f"{self.pack.__name__}.{name}")


def refused(fn: Callable[[], object]) -> str:
    try:
        fn()
    except Exception as e:  # the pack's modules are loaded twice (as ppd_train and inside the pack): match by text
        assert "PPDError" in [c.__name__ for c in type(e).__mro__], f"{type(e).__name__} is not a PPD error: {e}"
        return str(e)
    raise AssertionError("the bad input was accepted")


def cli_refused(ctx: Ctx, *argv: str, rc: int = 2) -> str:
    code, text = ctx.cli(*argv)
    assert code == rc, f"exit status {code}, expected {rc}: {text}"
    return text


def case_sweep_world_too_many_styles(ctx: Ctx) -> str:
    sweep = ctx.tmp / "sweep.toml"
    sweep.write_text('[[worlds]]\nname = "rich"\nseed = 2\nworld = { k_styles = 6 }\n\n'
                     '[[worlds]]\nname = "small"\nseed = 1\n')
    text = cli_refused(ctx, "demo", "--sweep", str(sweep), "--set", 'world.base="sdxl"', "--out",
                       str(ctx.tmp / "runs"), "--quiet")
    assert not (ctx.tmp / "runs").exists()  # refused before the first world ran
    return text


# ------------------------------------------------------------------------------------------------- builders
def _adapter_file(ctx: Ctx, name: str = "a.safetensors", edit_meta=None, edit_tensors=None) -> Path:
    from helpers import trained_looking_adapter
    from safetensors.torch import load_file, save_file

    from ppd_train.adapter import save_adapter
    from ppd_train.stage_c import load_stage_c

    path = ctx.tmp / name
    save_adapter(trained_looking_adapter(load_stage_c(ctx.files / "stage_c")), path)
    if edit_meta or edit_tensors:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata())
        tensors = load_file(path)
        if edit_meta:
            d = json.loads(meta["ppd_adapter"])
            edit_meta(d)
            meta["ppd_adapter"] = json.dumps(d)
        if edit_tensors:
            edit_tensors(tensors)
        save_file(tensors, path, metadata=meta)
    return path


def _load_adapter(path: Path):
    from ppd_train.adapter import load_adapter

    return load_adapter(path)


def _pairs(ctx: Ctx, rows=None, n: int = 2, fmt: str = "jsonl") -> Path:
    from helpers import write_pair_folder

    folder = write_pair_folder(ctx.tmp / "u", n=n, fmt=fmt)
    if rows is not None:
        (folder / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def _load_pairs(folder: Path):
    from ppd_train.pairs import load_pair_folder

    return load_pair_folder(folder)


def _shard(ctx: Ctx, rows, drop: tuple[str, ...] = ()) -> Path:
    import pyarrow.parquet as pq
    from helpers import write_pickapic

    path = write_pickapic(ctx.tmp / "train-00000.parquet", rows)
    if drop:
        pq.write_table(pq.read_table(path).drop_columns(list(drop)), path)
    return path


def _row(caption: str, a: int, b: int, l0: float, l1: float, user: int = 7, **kw) -> dict:
    from helpers import jpeg_bytes

    return dict(caption=caption, jpg_0=jpeg_bytes(a), jpg_1=jpeg_bytes(b), label_0=l0, label_1=l1, user_id=user, **kw)


def _pickapic(path: Path, users=None, problems=None):
    from ppd_train.pairs import load_pickapic

    return load_pickapic(path, users, problems)


def _embedding(embedder: str = "test", width: int = 24, seed: int = 0):
    from ppd_train.embedding import UserEmbedding

    return UserEmbedding(torch.randn(5, width, generator=torch.Generator().manual_seed(seed)), embedder)


# ----------------------------------------------------------------------------------------------- tune-user cases
def tune_case(*extra: str, start: str | None = "test", out_exists: bool = False) -> Callable[[Ctx], str]:
    """``ppd-train tune-user`` on the catalogue's synthetic data with a trained-looking adapter."""
    def run(ctx: Ctx) -> str:
        argv = ["tune-user", "--stage-c", str(ctx.files / "stage_c"), "--adapter", str(_adapter_file(ctx)),
                "--out", str(ctx.tmp / "tuned.safetensors"), "--quiet", "--steps", "1"]
        if start is not None:
            _embedding(start).save(ctx.tmp / "start.safetensors")
            argv += ["--embedding", str(ctx.tmp / "start.safetensors")]
        if out_exists:
            (ctx.tmp / "tuned.safetensors").write_bytes(b"the user's earlier result")
        rc_text = cli_refused(ctx, *argv, *extra)
        if out_exists:
            assert (ctx.tmp / "tuned.safetensors").read_bytes() == b"the user's earlier result"
        return rc_text
    return run


def _one_user_data(ctx: Ctx) -> str:
    from ppd_train.dpo_data import DPOData
    from ppd_train.tune import one_user

    one_user(DPOData.load(ctx.files / "data.safetensors"), "seen00")[0].save(ctx.tmp / "one.safetensors")
    return str(ctx.tmp / "one.safetensors")


def case_tune_no_start(ctx: Ctx) -> str:
    return tune_case("--data", _one_user_data(ctx), start=None)(ctx)


def case_tune_mix_without_library(ctx: Ctx) -> str:
    return tune_case("--data", _one_user_data(ctx), "--mode", "mix")(ctx)


def case_tune_other_embedder(ctx: Ctx) -> str:
    return tune_case("--data", _one_user_data(ctx), start="another-embedder")(ctx)


def case_tune_several_users(ctx: Ctx) -> str:
    return tune_case("--data", str(ctx.files / "data.safetensors"))(ctx)


def case_tune_user_in_two_folders(ctx: Ctx) -> str:
    from helpers import write_pair_folder

    folders = [str(write_pair_folder(ctx.tmp / name, n=3, seed=s, user_id="ann")) for s, name in enumerate("ab")]
    encoders = ["--effnet", str(ctx.tmp / "effnet.safetensors"), "--clip-text", str(ctx.tmp / "clip_g")]
    merged = tune_case("--pairs", *folders, "--merge-users", *encoders)(ctx)
    assert "is in both" not in merged and "effnet" in merged  # with the flag it goes on, to the (missing) encoders
    return tune_case("--pairs", *folders, *encoders)(ctx)


def case_tune_out_exists(ctx: Ctx) -> str:
    return tune_case("--data", _one_user_data(ctx), out_exists=True)(ctx)


def case_tune_images_without_encoders(ctx: Ctx) -> str:
    return tune_case("--pairs", str(_pairs(ctx)))(ctx)


# ------------------------------------------------------------------------------------------------- trainer cases
def case_lock_busy(ctx: Ctx) -> str:
    out = ctx.tmp / "run"
    code = (f"import sys, time; sys.path.insert(0, {str(REPO)!r}); from ppd_train.run_lock import out_dir_lock\n"
            f"with out_dir_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)\n")
    other = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout is not None and other.stdout.readline().strip() == "locked"
        text = cli_refused(ctx, *ctx.fit_args(out))
        assert f"pid {other.pid}" in text and not (out / "adapter.safetensors").exists()
        return text
    finally:
        other.kill()
        other.wait()


def case_lock_stale(ctx: Ctx) -> None:
    out = ctx.tmp / "run"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out.mkdir()
    (out / ".ppd-train.lock").write_text(f"pid {gone.pid} on somewhere")  # left by a run killed with -9
    rc, text = ctx.cli(*ctx.fit_args(out))
    assert rc == 0 and "adapter ->" in text, text


def config_case(key: str, value: str) -> Callable[[Ctx], str]:
    def run(ctx: Ctx) -> str:
        text = cli_refused(ctx, *ctx.fit_args(None, f"{key}={value}"))
        assert "Traceback" not in text and not (ctx.tmp / "run" / "adapter.safetensors").exists()
        return text
    return run


def case_out_dir_file(ctx: Ctx) -> str:
    (ctx.tmp / "run").write_text("not a folder")
    return cli_refused(ctx, *ctx.fit_args(ctx.tmp / "run"))


def case_out_dir_unwritable(ctx: Ctx) -> str:
    if sys.platform != "linux":
        pytest.skip("uses /sys, where nobody may create folders")
    return cli_refused(ctx, *ctx.fit_args(Path("/sys/ppd-run")))


def case_disk_full(ctx: Ctx) -> str:
    from ppd_train import safetensors_io

    real = os.replace

    def full(src, dst):  # the disk fills up while the third checkpoint is written
        if "step-00000003" in str(dst):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    ctx.monkeypatch.setattr(safetensors_io.os, "replace", full)
    text = cli_refused(ctx, *ctx.fit_args())
    assert "step-00000002" in text
    ctx.monkeypatch.undo()
    return text


def case_ctrl_c(ctx: Ctx) -> str:
    out = ctx.tmp / "run"
    args = ctx.fit_args(out)
    args[args.index("max_steps=3")] = "max_steps=100000"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # A suite started in the background (`make test &`, nohup) inherits SIGINT ignored, and Python then installs no
    # Ctrl+C handler in the child: give the child the default disposition, as a terminal's Ctrl+C would find it.
    proc = subprocess.Popen([sys.executable, "-m", "ppd_train", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    # generous: on a loaded 2-core machine importing torch alone can take a minute; Ctrl+C must come during training
    deadline = time.time() + 300
    while not list((out / "checkpoints").glob("step-*.safetensors")) and time.time() < deadline:
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    assert list((out / "checkpoints").glob("step-*.safetensors")), "fit wrote no checkpoint in 300 s"
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=180)
    assert proc.returncode == 130, stdout + stderr
    assert "Traceback" not in stderr
    return stderr


def case_finished_rerun(ctx: Ctx) -> None:
    assert ctx.cli(*ctx.fit_args())[0] == 0
    adapter = ctx.tmp / "run" / "adapter.safetensors"
    before = adapter.read_bytes()
    rc, text = ctx.cli(*ctx.fit_args())
    assert rc == 0 and adapter.read_bytes() == before and "already trained to step 3" in text, text
    assert "Raise max_steps to train on" in text, text


def case_summary_json(ctx: Ctx) -> None:
    from safetensors import safe_open

    def summary(path: Path) -> dict:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata()["ppd_adapter"]
        assert "NaN" not in raw and "Infinity" not in raw
        return json.loads(raw)["training"]

    assert ctx.cli(*ctx.fit_args())[0] == 0
    adapter = ctx.tmp / "run" / "adapter.safetensors"
    first = summary(adapter)
    adapter.unlink()  # finished but the adapter is gone: the rerun writes it from the last checkpoint, 0 new steps
    assert ctx.cli(*ctx.fit_args())[0] == 0
    again = summary(adapter)
    assert again["steps"] == 3 and again["final_loss"] == first["final_loss"] is not None


def case_resume_other_embeddings(ctx: Ctx) -> str:
    import shutil

    from ppd_train.embedding import UserEmbedding, load_embedding_table, save_embedding_table

    users = ctx.tmp / "users.safetensors"
    shutil.copy(ctx.files / "users.safetensors", users)
    assert ctx.cli(*ctx.fit_args(None, f"embeddings={users}"))[0] == 0
    table, info = load_embedding_table(users)
    save_embedding_table(users, {u: UserEmbedding(e.tokens * 1.5, e.embedder, e.meta) for u, e in table.items()},
                         info)  # the same users embedded again, into the same file
    return cli_refused(ctx, *ctx.fit_args(None, f"embeddings={users}", "max_steps=5"))


def case_truncated_newest(ctx: Ctx) -> None:
    assert ctx.cli(*ctx.fit_args())[0] == 0
    ckpts = sorted((ctx.tmp / "run" / "checkpoints").glob("step-*.safetensors"))
    newest = ckpts[-1]
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    (ctx.tmp / "run" / "adapter.safetensors").unlink()
    rc, text = ctx.cli(*ctx.fit_args())
    assert rc == 0 and "resuming from the older checkpoint step-00000002" in text, text


def case_truncated_only(ctx: Ctx) -> str:
    assert ctx.cli(*ctx.fit_args(None, "keep_checkpoints=1"))[0] == 0
    (only,) = (ctx.tmp / "run" / "checkpoints").glob("step-*.safetensors")
    only.write_bytes(only.read_bytes()[:100])
    (ctx.tmp / "run" / "adapter.safetensors").unlink()
    return cli_refused(ctx, *ctx.fit_args(None, "keep_checkpoints=1"))


def case_resume_earlier_8bit_state(ctx: Ctx) -> str:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from ppd_train import optim

    ctx.monkeypatch.setattr(optim, "MIN_8BIT_SIZE", 1)  # the tiny adapter's tensors get 8-bit codes too
    assert ctx.cli(*ctx.fit_args(None, "optimizer=adamw8bit"))[0] == 0
    newest = sorted((ctx.tmp / "run" / "checkpoints").glob("step-*.safetensors"))[-1]
    with safe_open(str(newest), framework="pt") as f:
        metadata = f.metadata()
    # the state as PPD wrote its square-root codes before issue 25: these names, one scale per block and no span
    earlier = {"exp_avg_ratio_codes": "exp_avg_codes", "exp_avg_ratio_scale": "exp_avg_scale",
               "exp_avg_sq_root_codes": "exp_avg_sq_codes", "exp_avg_sq_root_scale": "exp_avg_sq_scale"}
    tensors = {}
    for key, value in load_file(newest).items():
        head, name = key.rsplit(".", 1)
        if name != "exp_avg_sq_root_span":
            tensors[f"{head}.{earlier.get(name, name)}"] = value
    save_file(tensors, newest, metadata)
    return cli_refused(ctx, *ctx.fit_args(None, "optimizer=adamw8bit", "max_steps=5"))


def case_adamw8bit_six_decades(ctx: Ctx) -> None:
    from test_optim import six_decades_against_adamw

    d32, d8, _ = six_decades_against_adamw(top=0.0, steps=100)
    ratio = d8.abs() / d32.abs()
    assert (d8.sign() == d32.sign()).all() and ratio.max() <= 1.5 and ratio.min() >= 0.6


def case_weights_diverge(ctx: Ctx) -> str:
    from ppd_train.dpo_data import DPOData
    from ppd_train.embedding import load_embedding_table
    from ppd_train.stage_c import load_stage_c
    from ppd_train.train import TrainConfig, Trainer

    data = DPOData.load(ctx.files / "data.safetensors")
    tokens, embedder = data.user_tokens(load_embedding_table(ctx.files / "users.safetensors")[0])
    trainer = Trainer(TrainConfig(out_dir=str(ctx.tmp / "run"), batch_size=4, tensorboard=False),
                      load_stage_c(ctx.files / "stage_c"), data, tokens, embedder, show_progress=False)
    for group in trainer.optimizer.param_groups:  # a schedule gone wrong: the update overflows every weight
        group["lr"] = float("inf")
    return refused(trainer.train_step)


def case_dpo_data_bad_index(ctx: Ctx) -> str:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    src = ctx.files / "data.safetensors"
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(src)
    tensors["user_idx"][0] = 99  # a damaged or hand-made file: a user that is not in its user list
    save_file(tensors, ctx.tmp / "data.safetensors", metadata=meta)
    return cli_refused(ctx, *ctx.fit_args(None, f"data={ctx.tmp / 'data.safetensors'}"))


def case_data_other_stage_c(ctx: Ctx) -> str:
    from ppd_train.dpo_data import DPOData

    data = DPOData.load(ctx.files / "data.safetensors")
    data.text, data.pooled = torch.zeros(len(data.text), 77, 48), torch.zeros(len(data.text), 1, 48)  # another CLIP
    data.save(ctx.tmp / "data.safetensors")
    return cli_refused(ctx, *ctx.fit_args(None, f"data={ctx.tmp / 'data.safetensors'}"))


def case_data_other_base(ctx: Ctx) -> str:
    from ppd_train.dpo_data import DPOData

    data = DPOData.load(ctx.files / "data.safetensors")
    n = len(data)
    DPOData(torch.zeros(n, 4, 4, 4), torch.ones(n, 4, 4, 4), data.caption_idx, data.user_idx, data.text, data.pooled,
            data.user_ids, time_ids=torch.full((n, 6), 32.0), base="sdxl").save(ctx.tmp / "sdxl_data.safetensors")
    return cli_refused(ctx, *ctx.fit_args(None, f"data={ctx.tmp / 'sdxl_data.safetensors'}"))


def case_two_bases(ctx: Ctx) -> str:
    return cli_refused(ctx, *ctx.fit_args(None, f"sdxl={ctx.files / 'stage_c'}"))


def case_prepare_no_encoders(ctx: Ctx) -> str:
    return cli_refused(ctx, "prepare", "--pairs", str(ctx.tmp), "--out", str(ctx.tmp / "d.safetensors"))


def case_sdxl_file_not_sdxl(ctx: Ctx) -> str:
    from safetensors.torch import save_file

    from ppd_train.sdxl import load_sdxl

    save_file({"clip_txt_mapper.weight": torch.zeros(2, 2)}, ctx.tmp / "stage_c.safetensors")  # a Stage C single file
    return refused(lambda: load_sdxl(ctx.tmp / "stage_c.safetensors"))


def _sdxl_single_file(ctx: Ctx) -> tuple[Path, Path, Path]:
    """A tiny SDXL pipeline folder, the same model as one checkpoint in the original layout, and a pair folder (built
    once per module, in ``ctx.files``)."""
    from helpers import write_pair_folder

    from ppd_train.tiny import build_tiny_sdxl, write_tiny_sdxl_single_file

    folder, path = ctx.files / "sdxl", ctx.files / "sdxl.safetensors"
    if not path.is_file():
        build_tiny_sdxl(folder)
        write_tiny_sdxl_single_file(folder, path)
        write_pair_folder(ctx.files / "sdxl_pairs", n=2)
    return folder, path, ctx.files / "sdxl_pairs"


def _prepare_sdxl(ctx: Ctx, sdxl: Path, *extra: str) -> str:
    _, _, pairs = _sdxl_single_file(ctx)
    return cli_refused(ctx, "prepare", "--pairs", str(pairs), "--sdxl", str(sdxl), "--image-size", "16", "--quiet",
                       "--out", str(ctx.tmp / "d.safetensors"), *extra)


def case_sdxl_file_pickle(ctx: Ctx) -> str:
    torch.save({"state_dict": {}}, ctx.tmp / "model.ckpt")
    return _prepare_sdxl(ctx, ctx.tmp / "model.ckpt")


def case_sdxl_file_sd15(ctx: Ctx) -> str:
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2, 4, 3, 3),
               "first_stage_model.encoder.conv_in.weight": torch.zeros(2, 3, 3, 3),
               "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)},
              ctx.tmp / "sd15.safetensors")
    return _prepare_sdxl(ctx, ctx.tmp / "sd15.safetensors")


def case_sdxl_file_unet_only(ctx: Ctx) -> str:
    from safetensors.torch import load_file, save_file

    _, path, _ = _sdxl_single_file(ctx)
    save_file({k: v for k, v in load_file(path).items() if k.startswith("model.diffusion_model.")},
              ctx.tmp / "unet_only.safetensors")
    return _prepare_sdxl(ctx, ctx.tmp / "unet_only.safetensors")


def case_sdxl_file_missing_weight(ctx: Ctx) -> str:
    from safetensors.torch import load_file, save_file

    folder, path, _ = _sdxl_single_file(ctx)
    tensors = load_file(path)
    del tensors["first_stage_model.encoder.conv_in.bias"]
    save_file(tensors, ctx.tmp / "partial.safetensors")
    return _prepare_sdxl(ctx, ctx.tmp / "partial.safetensors", "--sdxl-config", str(folder))


def case_sdxl_file_truncated(ctx: Ctx) -> str:
    _, path, _ = _sdxl_single_file(ctx)
    data = path.read_bytes()
    (ctx.tmp / "half.safetensors").write_bytes(data[:len(data) // 2])
    return _prepare_sdxl(ctx, ctx.tmp / "half.safetensors")


def case_sdxl_file_no_tokenizer(ctx: Ctx) -> str:
    return _prepare_sdxl(ctx, _sdxl_single_file(ctx)[1])


def case_sdxl_file_other_shape(ctx: Ctx) -> str:
    folder, path, _ = _sdxl_single_file(ctx)
    return _prepare_sdxl(ctx, path, "--sdxl-tokenizer", str(folder / "tokenizer"))


def case_sdxl_folder_with_tokenizer(ctx: Ctx) -> str:
    folder, _, _ = _sdxl_single_file(ctx)
    return _prepare_sdxl(ctx, folder, "--sdxl-tokenizer", str(folder / "tokenizer"))


def case_adapter_other_base(ctx: Ctx) -> str:
    from ppd_train.adapter import AdapterConfig, PPDAdapter
    from ppd_train.binding import PPDBinding, model_info
    from ppd_train.tiny import build_tiny_sdxl_unet, build_tiny_stage_c

    stage_c = build_tiny_stage_c(seed=0)
    adapter = PPDAdapter(AdapterConfig.for_model(model_info(stage_c), embed_dim=8, num_tokens=2))
    return refused(lambda: PPDBinding(build_tiny_sdxl_unet(seed=0), adapter))


def case_embed_zero_pairs(ctx: Ctx) -> str:
    return cli_refused(ctx, "embed", "--pairs", str(ctx.tmp), "--out", str(ctx.tmp / "t.safetensors"), "--clip",
                       str(ctx.tmp), "--n-pairs", "0")


def case_eval_out_unwritable(ctx: Ctx) -> str:
    if sys.platform != "linux":
        pytest.skip("uses /sys, where nobody may create files")
    assert ctx.cli(*ctx.fit_args())[0] == 0
    (ctx.tmp / "rewards_bad_inputs.py").write_text("def mean(user_id, latents, caption_idx):\n"
                                                   "    return latents.mean(dim=(1, 2, 3))\n")
    ctx.monkeypatch.syspath_prepend(str(ctx.tmp))
    f = ctx.files
    ev = ctx.tmp / "eval.toml"
    ev.write_text(f'stage_c = "{f / "stage_c"}"\nadapter = "{ctx.tmp / "run" / "adapter.safetensors"}"\n'
                  f'embeddings = "{f / "users.safetensors"}"\ndata = "{f / "data.safetensors"}"\n'
                  'reward = "rewards_bad_inputs:mean"\nsamples = 1\nsteps = 1\nout = "/sys/ppd-metrics.json"\n')
    try:
        return cli_refused(ctx, "eval", "--config", str(ev))
    finally:
        sys.modules.pop("rewards_bad_inputs", None)


def case_log_never_nan(ctx: Ctx) -> None:
    from ppd_train.dpo_data import DPOData
    from ppd_train.embedding import load_embedding_table
    from ppd_train.stage_c import load_stage_c
    from ppd_train.train import TrainConfig, Trainer

    data = DPOData.load(ctx.files / "data.safetensors")
    tokens, embedder = data.user_tokens(load_embedding_table(ctx.files / "users.safetensors")[0])
    cfg = TrainConfig(out_dir=str(ctx.tmp / "run"), max_steps=4, batch_size=4, log_every=1, max_nan_steps=2,
                      tensorboard=False)
    trainer = Trainer(cfg, load_stage_c(ctx.files / "stage_c"), data, tokens, embedder, show_progress=False)
    trainer.cfg.beta = float("nan")  # the loss goes NaN (validate refuses such a beta: poisoned after it)
    refused(trainer.run)

    def strict(token):
        raise AssertionError(f"{token} in train_log.jsonl")

    lines = (ctx.tmp / "run" / "train_log.jsonl").read_text().splitlines()
    assert lines and all(json.loads(line, parse_constant=strict)["loss"] is None for line in lines)


def case_bin_only(ctx: Ctx) -> str:
    from ppd_train.stage_c import load_stage_c
    from ppd_train.tiny import build_tiny_stage_c

    folder = ctx.tmp / "stage_c_bin"
    build_tiny_stage_c(seed=0).save_pretrained(folder, safe_serialization=False)
    assert list(folder.glob("*.bin"))
    return refused(lambda: load_stage_c(folder))


# ------------------------------------------------------------------------------------------------- file cases
def case_temp_from_killed_save(ctx: Ctx) -> None:
    from ppd_train.safetensors_io import atomic_save_safetensors

    target = ctx.tmp / "step-00000001.safetensors"
    code = (f"import os, sys; sys.path.insert(0, {str(REPO)!r}); from pathlib import Path\n"
            "from ppd_train.safetensors_io import _new_temp\n"
            f"Path(_new_temp(Path({str(target)!r}))).write_bytes(b'x' * 100000); os._exit(9)\n")  # dies mid-save
    subprocess.run([sys.executable, "-c", code], check=False)
    assert len(list(ctx.tmp.glob(".*.tmp"))) == 1
    atomic_save_safetensors({"x": torch.zeros(2)}, target, {})
    assert not list(ctx.tmp.glob(".*.tmp")) and target.is_file()


def case_umask(ctx: Ctx) -> None:
    from ppd_train.embedding import save_embedding_table

    old = os.umask(0o022)
    try:
        _embedding().save(ctx.tmp / "e.safetensors")
        save_embedding_table(ctx.tmp / "t.safetensors", {"u": _embedding()})
    finally:
        os.umask(old)
    for name in ("e.safetensors", "t.safetensors"):
        assert stat.S_IMODE((ctx.tmp / name).stat().st_mode) == 0o644, name


def case_adapter_nan(ctx: Ctx) -> str:
    path = _adapter_file(ctx, edit_tensors=lambda t: t["blocks.0.to_v.weight"].view(-1)[0:1].fill_(float("nan")))
    return refused(lambda: _load_adapter(path))


def case_adapter_huge_meta(ctx: Ctx) -> str:
    path = _adapter_file(ctx, edit_meta=lambda d: d.update(num_tokens=10**9))
    return refused(lambda: _load_adapter(path))


def case_adapter_extra_tensor(ctx: Ctx) -> str:
    path = _adapter_file(ctx, edit_tensors=lambda t: t.update(extra=torch.zeros(3)))
    return refused(lambda: _load_adapter(path))


def case_adapter_truncated(ctx: Ctx) -> str:
    path = _adapter_file(ctx)
    path.write_bytes(path.read_bytes()[:-1000])
    return refused(lambda: _load_adapter(path))


def case_adapter_pickle(ctx: Ctx) -> str:
    path = ctx.tmp / "adapter.ckpt"
    path.write_bytes(b"\x80\x04not really")
    return refused(lambda: _load_adapter(path))


def case_adapter_other_stage_c(ctx: Ctx) -> str:
    from ppd_train.adapter import ModelInfo, check_base, read_adapter_config

    config = read_adapter_config(_adapter_file(ctx))[0]
    return refused(lambda: check_base(config, ModelInfo((1536,) * 32, (24,) * 32), "adapter 'a'"))


def case_embedding_other_embedder(ctx: Ctx) -> str:
    from ppd_train.adapter import check_embedding, read_adapter_config

    config = read_adapter_config(_adapter_file(ctx))[0]
    emb = _embedding("vlm:other:direct:all")
    return refused(lambda: check_embedding(config, tuple(emb.tokens.shape), emb.embedder))


def case_embedding_nan(ctx: Ctx) -> str:
    from safetensors.torch import load_file, save_file

    from ppd_train.embedding import UserEmbedding

    path = ctx.tmp / "e.safetensors"
    _embedding().save(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(path)
    tensors["tokens"][0, 0] = float("inf")
    save_file(tensors, path, metadata=meta)
    return refused(lambda: UserEmbedding.load(path))


# ------------------------------------------------------------------------------------------------- image cases
def case_layers_twice(ctx: Ctx) -> str:
    from ppd_train.embedders.vlm import parse_layers

    return refused(lambda: parse_layers("-1,28", 29))


def case_junk_png_600mb(ctx: Ctx) -> str:
    folder = _pairs(ctx)
    with open(folder / "good_0.png", "wb") as f:  # sparse: 600 MB on paper, nothing on disk
        f.write(b"junk")
        f.truncate(600 * 2**20)
    return refused(lambda: _load_pairs(folder))


def case_junk_png_small(ctx: Ctx) -> str:
    folder = _pairs(ctx)
    (folder / "good_0.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return refused(lambda: _load_pairs(folder))


def case_huge_pixels(ctx: Ctx) -> str:
    from PIL import Image

    folder = _pairs(ctx)
    Image.new("1", (9000, 8000)).save(folder / "good_0.png")
    return refused(lambda: _load_pairs(folder))


# ------------------------------------------------------------------------------------------------- pair cases
def row(prompt="a lighthouse", chosen="good_0.png", rejected="bad_0.jpg", **kw) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, **kw}


def pair_case(*rows: dict) -> Callable[[Ctx], str]:
    return lambda ctx: refused(lambda: _load_pairs(_pairs(ctx, list(rows))))


def case_same_bytes(ctx: Ctx) -> str:
    folder = _pairs(ctx)
    (folder / "copy.png").write_bytes((folder / "good_0.png").read_bytes())
    (folder / "pairs.jsonl").write_text(json.dumps(row(rejected="copy.png")) + "\n")
    return refused(lambda: _load_pairs(folder))


def case_both_pair_files(ctx: Ctx) -> str:
    folder = _pairs(ctx)
    (folder / "pairs.csv").write_text("prompt,chosen,rejected\nother,good_1.png,bad_1.jpg\n")
    return refused(lambda: _load_pairs(folder))


def case_exif_rotated(ctx: Ctx) -> None:
    from helpers import random_image
    from PIL import Image

    folder = _pairs(ctx)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: the camera was turned; viewers show the photo rotated by 90 degrees
    random_image(5, size=(60, 40)).save(folder / "good_0.png", exif=exif.tobytes())
    assert _load_pairs(folder)[0].chosen.load().size == (40, 60)


def case_csv_bom(ctx: Ctx) -> None:
    folder = _pairs(ctx, fmt="csv")
    (folder / "pairs.csv").write_bytes(b"\xef\xbb\xbf" + (folder / "pairs.csv").read_bytes())
    assert [p.prompt for p in _load_pairs(folder)][0] == "a lighthouse at dusk, version 0"


def case_csv_cp1252(ctx: Ctx) -> None:
    folder = _pairs(ctx, fmt="csv")
    (folder / "pairs.csv").write_bytes("prompt,chosen,rejected\ncaf\u00e9 au lait \u2013 soft,good_0.png,bad_0.jpg\n"
                                       .encode("cp1252"))
    assert _load_pairs(folder)[0].prompt == "caf\u00e9 au lait \u2013 soft"


def case_csv_short_row(ctx: Ctx) -> str:
    folder = _pairs(ctx, fmt="csv")
    (folder / "pairs.csv").write_text("prompt,chosen,rejected\nno rejected,good_0.png\n")
    return refused(lambda: _load_pairs(folder))


def case_symlinks(ctx: Ctx) -> None:
    """One policy for every PPD folder: a symlink placed inside is followed; a name cannot climb out."""
    outside = ctx.tmp / "elsewhere"
    outside.mkdir()
    folder = _pairs(ctx)
    (folder / "good_0.png").rename(outside / "good_0.png")
    (folder / "good_0.png").symlink_to(outside / "good_0.png")
    assert _load_pairs(folder)[0].chosen.load().size == (40, 48)
    models = ctx.tmp / "models"
    models.mkdir()
    (models / "shared.safetensors").symlink_to(_adapter_file(ctx))
    folders = ctx.node("nodes.folders")
    assert folders.find("ppd_adapters", "shared.safetensors", "PPD adapter", [models]).is_symlink()


# ------------------------------------------------------------------------------------------------- Pick-a-Pic cases
def case_pickapic_nan_label(ctx: Ctx) -> None:
    path = _shard(ctx, [_row("real", 1, 2, 1.0, 0.0), _row("nan", 3, 4, float("nan"), 0.0)])
    (pair,) = _pickapic(path)["7"]
    assert pair.prompt == "real"


def case_pickapic_same_bytes(ctx: Ctx) -> None:
    path = _shard(ctx, [_row("real", 1, 2, 1.0, 0.0), _row("same", 3, 3, 1.0, 0.0)], drop=("are_different",))
    assert [p.prompt for p in _pickapic(path)["7"]] == ["real"]


def case_pickapic_duplicate(ctx: Ctx) -> None:
    path = _shard(ctx, [_row("cat", 1, 2, 1.0, 0.0), _row("cat", 1, 2, 1.0, 0.0), _row("cat", 2, 1, 0.0, 1.0)])
    assert len(_pickapic(path)["7"]) == 1


def case_pickapic_corrupt(ctx: Ctx) -> None:
    rows = [_row("good", 1, 2, 1.0, 0.0), _row("bad", 3, 4, 1.0, 0.0), _row("dog", 5, 6, 0.0, 1.0, user=8)]
    rows[1]["jpg_0"] = b"\xff\xd8\xff" + b"\x00" * 50  # a JPEG signature, then nothing
    problems: list[str] = []
    users = _pickapic(_shard(ctx, rows), problems=problems)
    assert [p.prompt for p in users["7"]] == ["good"] and len(users["8"]) == 1
    assert "row 1 (jpg_0, user 7)" in problems[0], problems


def case_pickapic_unknown_user(ctx: Ctx) -> str:
    path = _shard(ctx, [_row("a", 1, 2, 1.0, 0.0), _row("b", 3, 4, 1.0, 0.0, user=8)])
    return refused(lambda: _pickapic(path, ["99"]))


def case_pickapic_only_ties(ctx: Ctx) -> str:
    path = _shard(ctx, [_row("a", 1, 2, 1.0, 0.0), _row("tie", 3, 4, 0.5, 0.5, user=9)])
    return refused(lambda: _pickapic(path, ["9"]))


def case_pickapic_row_numbers(ctx: Ctx) -> None:
    path = _shard(ctx, [_row("a", 1, 2, 1.0, 0.0), _row("b", 3, 4, 1.0, 0.0), _row("c", 5, 6, 0.0, 1.0, user=8)])
    (pair,) = _pickapic(path, ["8"])["8"]
    assert pair.source == "train-00000.parquet row 2"


def case_embed_skips_unreadable(ctx: Ctx) -> None:
    from ppd_train.embed_dataset import embed_users
    from ppd_train.embedders.pairdiff import PairDifferenceEmbedder
    from ppd_train.pairs import load_users

    rows = [_row(f"c{i}", 10 * i, 10 * i + 1, 1.0, 0.0, user=u) for u in (1, 2, 3) for i in range(2)]
    cut = rows[2]["jpg_1"]
    rows[2]["jpg_1"] = cut[: len(cut) * 2 // 3]  # user 2: an image cut short; its header passes, decoding fails
    users = load_users([_shard(ctx, rows)])

    def mean_colour(images):
        import numpy as np

        return torch.stack([torch.from_numpy(np.asarray(im.resize((4, 4)), dtype=np.float32).reshape(-1, 3).mean(0))
                            for im in images])

    table = embed_users(users, PairDifferenceEmbedder(mean_colour, "mean"), ctx.tmp / "t.safetensors", n_pairs=2,
                        show_progress=False)
    assert sorted(table) == ["1", "3"]
    assert "user(s) skipped because an image of theirs cannot be read: user 2" in ctx.capsys.readouterr().out


# ------------------------------------------------------------------------------------------------- node cases
def strength_case(**values) -> Callable[[Ctx], str]:
    def run(ctx: Ctx) -> str:
        nodes = ctx.node("nodes.adapter_nodes")
        queued = nodes.PPDApplyAdapter.VALIDATE_INPUTS(**values)
        assert isinstance(queued, str), queued  # shown when the prompt is queued
        linked = {"weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, **values}
        # the same values arriving through links (None at queue time) are refused when the node runs
        assert nodes.PPDApplyAdapter.VALIDATE_INPUTS() is True
        assert refused(lambda: nodes.PPDApplyAdapter().apply(None, None, None, **linked)) == queued
        return queued
    return run


def case_interpolate(weight) -> Callable[[Ctx], str]:
    def run(ctx: Ctx) -> str:
        nodes = ctx.node("nodes.embedding_nodes")
        emb = ctx.node("ppd_train.embedding")
        a, b = (emb.UserEmbedding(torch.randn(5, 24), "test") for _ in range(2))
        return refused(lambda: nodes.PPDEmbeddingInterpolate().run(a, b, weight, "lerp"))
    return run


def case_mix_nan(ctx: Ctx) -> str:
    nodes = ctx.node("nodes.embedding_nodes")
    emb = ctx.node("ppd_train.embedding")
    a, b = (emb.UserEmbedding(torch.randn(5, 24), "test") for _ in range(2))
    return refused(lambda: nodes.PPDEmbeddingMix().run(a, float("nan"), b, 1.0, 1.0, 1.0))


def case_mix_huge(ctx: Ctx) -> None:
    nodes = ctx.node("nodes.embedding_nodes")
    emb = ctx.node("ppd_train.embedding")
    a, b = (emb.UserEmbedding(torch.randn(5, 24, generator=torch.Generator().manual_seed(i)), "t") for i in (1, 2))
    (out,) = nodes.PPDEmbeddingMix().run(a, 1e300, b, 3e300, 1.0, 1.0)
    torch.testing.assert_close(out.tokens, 0.25 * a.tokens + 0.75 * b.tokens)


def case_image_batch_nan(ctx: Ctx) -> str:
    nodes = ctx.node("nodes.pair_nodes")
    images = torch.rand(2, 32, 32, 3)
    images[0, 0, 0, 0] = float("nan")
    return refused(lambda: nodes.PPDPreferencePairsFromImages().build(images, torch.rand(2, 32, 32, 3), "x", "A"))


def case_node_nul(ctx: Ctx) -> str:
    folders = ctx.node("nodes.folders")
    return refused(lambda: folders.find("ppd_adapters", "a\x00.safetensors", "PPD adapter", [ctx.tmp]))


def case_node_climb(ctx: Ctx) -> str:
    folders = ctx.node("nodes.folders")
    return refused(lambda: folders.find("ppd_adapters", "../../secret.safetensors", "PPD adapter", [ctx.tmp]))


def case_long_prefix(ctx: Ctx) -> str:
    nodes = ctx.node("nodes.embedding_nodes")
    emb = ctx.node("ppd_train.embedding")
    return refused(lambda: nodes.save_embedding(emb.UserEmbedding(torch.randn(5, 24), "t"), ctx.tmp, "x" * 300))



def case_tune_sdxl_stage_c_vae(ctx: Ctx) -> str:
    return refused(lambda: ctx.node("nodes.tune_nodes").check_sdxl_vae(16, 32))  # what Stage C's VAE reports


def case_tune_sdxl_other_clip(ctx: Ctx) -> str:
    from test_tune_node import SDXL_1

    tn = ctx.node("nodes.tune_nodes")
    config = tn.sdxl_diffusers_config(SDXL_1)  # Stage C's CLIP-G: 1280 wide, pooled 1280
    return refused(lambda: tn.check_clip(torch.zeros(77, 1280), torch.zeros(1, 1280), config,
                                         "the connected SDXL model"))


def case_tune_sdxl_layout(ctx: Ctx) -> str:
    from test_tune_node import SDXL_1

    return refused(lambda: ctx.node("nodes.tune_nodes").sdxl_diffusers_config({**SDXL_1,
                                                                               "transformer_depth_middle": 1}))

# --- round 2: data ---
def _folder(ctx: Ctx, name: str, seed: int = 0, user_id: str | None = None) -> Path:
    from helpers import write_pair_folder

    return write_pair_folder(ctx.tmp / name, n=2, seed=seed, user_id=user_id)


def _users(*sources, **kw):
    from ppd_train.pairs import load_users

    return load_users(list(sources), **kw)


def _typed_shard(ctx: Ctx, name: str, rows, pa_type) -> Path:
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = _shard(ctx, [{**r, "user_id": 0} for r in rows]).rename(ctx.tmp / name)
    table = pq.read_table(path)
    column = pa.array([r["user_id"] for r in rows], pa_type)
    pq.write_table(table.set_column(table.schema.get_field_index("user_id"), "user_id", column), path)
    return path


def case_user_in_two_folders(ctx: Ctx) -> str:
    return refused(lambda: _users(_folder(ctx, "one", 1, "anna"), _folder(ctx, "two", 2, "anna")))


def case_source_twice(ctx: Ctx) -> str:
    folder = _folder(ctx, "ann")
    return refused(lambda: _users(folder, ctx.tmp / "." / "ann"))


def case_user_id_types(ctx: Ctx) -> None:
    import pyarrow as pa

    shards = [_typed_shard(ctx, f"{i}.parquet", [_row(f"c{i}", 2 * i, 2 * i + 1, 0.0, 1.0, user=u)], t)
              for i, (u, t) in enumerate(((3, pa.int64()), (3.0, pa.float64()), ("3", pa.string())))]
    assert {u: len(p) for u, p in _users(*shards).items()} == {"3": 3}


def case_user_id_fractional(ctx: Ctx) -> str:
    import pyarrow as pa

    path = _typed_shard(ctx, "s.parquet", [_row("a", 1, 2, 1.0, 0.0, user=3.5)], pa.float64())
    return refused(lambda: _pickapic(path))


def case_user_id_null(ctx: Ctx) -> None:
    import pyarrow as pa

    problems: list[str] = []
    path = _typed_shard(ctx, "s.parquet", [_row("a", 1, 2, 1.0, 0.0, user=3), _row("b", 3, 4, 1.0, 0.0, user=None)],
                        pa.int64())
    assert list(_pickapic(path, problems=problems)) == ["3"] and "skipped without a user id" in problems[0]


def case_empty_parquet(ctx: Ctx) -> str:
    import pyarrow.parquet as pq

    path = _shard(ctx, [_row("a", 1, 2, 1.0, 0.0)])
    pq.write_table(pq.read_table(path).slice(0, 0), path)
    return refused(lambda: _users(path))


def case_embed_other_dataset(ctx: Ctx) -> None:
    from ppd_train.embed_dataset import embed_users
    from ppd_train.embedders.pairdiff import PairDifferenceEmbedder

    embedder = PairDifferenceEmbedder(lambda images: torch.ones(len(images), 3), "ones")
    out = ctx.tmp / "t.safetensors"

    def killed(n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        embed_users(_users(_folder(ctx, "old")), embedder, out, n_pairs=2, show_progress=False, progress=killed)
    table = embed_users(_users(_folder(ctx, "new", 1)), embedder, out, n_pairs=2, show_progress=False)
    assert list(table) == ["new"]


def case_prompt_u2028(ctx: Ctx) -> None:
    folder = _pairs(ctx)
    rows = [row(prompt="first\u2028line"), row(prompt="second\u0085", chosen="good_1.png", rejected="bad_1.jpg")]
    (folder / "pairs.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    assert [p.prompt for p in _load_pairs(folder)] == ["first\u2028line", "second\u0085"]


def case_pickapic_null_caption(ctx: Ctx) -> None:
    problems: list[str] = []
    users = _pickapic(_shard(ctx, [_row("a", 1, 2, 1.0, 0.0), _row(None, 3, 4, 1.0, 0.0), _row(" ", 5, 6, 1.0, 0.0)]),
                      problems=problems)
    assert [p.prompt for p in users["7"]] == ["a"] and problems[0].startswith("2 Pick-a-Pic row(s) skipped without")


def case_pickapic_reversed(ctx: Ctx) -> None:
    problems: list[str] = []
    rows = [_row("cat", 1, 2, 0.0, 1.0), _row("dog", 3, 4, 1.0, 0.0), _row("cat", 1, 2, 1.0, 0.0)]
    assert [p.prompt for p in _pickapic(_shard(ctx, rows), problems=problems)["7"]] == ["dog"]
    assert "row 0 vs train-00000.parquet row 2 (user 7)" in problems[0]


def case_image_is_folder(ctx: Ctx) -> str:
    folder = _pairs(ctx, [row(chosen="sub")])
    (folder / "sub").mkdir()
    return refused(lambda: _load_pairs(folder))


def case_pair_file_fifo(ctx: Ctx) -> str:
    folder = _pairs(ctx)
    (folder / "pairs.jsonl").unlink()
    os.mkfifo(folder / "pairs.jsonl")
    return refused(lambda: _load_pairs(folder))


def case_image_too_narrow(ctx: Ctx) -> str:
    from PIL import Image

    folder = _pairs(ctx, [row(chosen="strip.png")])
    Image.new("RGB", (3000, 10)).save(folder / "strip.png")
    return refused(lambda: _load_pairs(folder)[0].chosen.load())


def case_embed_mixed_shapes(ctx: Ctx) -> str:
    from ppd_train.embed_dataset import embed_users
    from ppd_train.embedders.pairdiff import PairDifferenceEmbedder

    widths = iter([3, 5])
    embedder = PairDifferenceEmbedder(lambda images: torch.ones(len(images), next(widths)), "changing")
    users = _users(_folder(ctx, "a"), _folder(ctx, "b", 1))
    return refused(lambda: embed_users(users, embedder, ctx.tmp / "t.safetensors", n_pairs=2, batch_users=1,
                                       show_progress=False))


# --- round 2: picker ---
ROUTE_USAGE = 'send JSON {"request_id": "<id from GET /ppd/picker/pending>", "choice": "A" | "B" | "skip"}'


def _route(ctx: Ctx, body: bytes, status: int) -> str:
    """What ``POST /ppd/picker/choose`` answers for ``body`` (the route's logic, as the aiohttp glue calls it)."""
    picker = ctx.node("ppd_train.picker")
    pending = picker.PendingChoices()
    pending.open({"index": 1})
    got, answer = picker.choose_response(pending, body)
    assert got == status and len(pending.pending()) == 1, (got, answer)
    assert len(answer["error"]) < 300 and "xxxxx" not in answer["error"]  # never the input back
    return answer["error"]


def case_route_big_body(ctx: Ctx) -> str:
    return _route(ctx, b'{"request_id": "' + b"x" * 70000 + b'", "choice": "A"}', 413)


def case_route_long_id(ctx: Ctx) -> str:
    return _route(ctx, json.dumps({"request_id": "x" * 60000, "choice": "A"}).encode(), 400)


def case_route_unknown_id(ctx: Ctx) -> str:
    return _route(ctx, json.dumps({"request_id": "0" * 32, "choice": "A"}).encode(), 404)


def case_route_deep_json(ctx: Ctx) -> str:
    return _route(ctx, b"[" * 60000, 400)


def _pair_set(ctx: Ctx, name: str) -> str:
    picker = ctx.node("ppd_train.picker")
    root = ctx.tmp / "input"
    root.mkdir(exist_ok=True)
    message = refused(lambda: picker.resolve_pair_set(name, root))
    assert "Errno" not in message and not (root / "deep").exists()
    return message


def case_pair_set_deep(ctx: Ctx) -> str:
    return _pair_set(ctx, "/".join(["deep"] * 400))


def case_pair_set_long(ctx: Ctx) -> str:
    return _pair_set(ctx, "x" * 300)


def case_pair_set_images(ctx: Ctx) -> str:
    from helpers import random_image

    (ctx.tmp / "input" / "photos").mkdir(parents=True)
    random_image(1).save(ctx.tmp / "input" / "photos" / "holiday.png")
    return _pair_set(ctx, "photos")


def case_pair_set_symlink(ctx: Ctx) -> str:
    (ctx.tmp / "input").mkdir()
    (ctx.tmp / "elsewhere").mkdir()
    (ctx.tmp / "input" / "linked").symlink_to(ctx.tmp / "elsewhere", target_is_directory=True)
    return _pair_set(ctx, "linked/set")


def case_pair_set_absolute(ctx: Ctx) -> None:
    picker = ctx.node("ppd_train.picker")
    assert picker.resolve_pair_set(str(ctx.tmp / "anna" / "portraits"), ctx.tmp) == (
        ctx.tmp / "anna" / "portraits", "anna/portraits")


def case_node_absolute_inside(ctx: Ctx) -> None:
    folders = ctx.node("nodes.folders")
    other = ctx.tmp / "other"
    other.mkdir()
    (ctx.tmp / "a.safetensors").write_bytes(b"x")
    assert folders.find("ppd_adapters", str(ctx.tmp / "a.safetensors"), "PPD adapter", [other, ctx.tmp]) == \
        ctx.tmp / "a.safetensors"


def case_picker_timeout(ctx: Ctx) -> str:
    picker = ctx.node("ppd_train.picker")
    pending = picker.PendingChoices()
    request = pending.open({"index": 1, "total": 1, "pair_set": "my_pairs"})
    ticks = iter(range(10**6))
    message = refused(lambda: pending.wait(request, lambda: None, timeout=600, poll=0.0001,
                                           clock=lambda: float(next(ticks))))
    assert pending.pending() == []
    return message


def case_picker_umask(ctx: Ctx) -> None:
    from helpers import random_image

    writer = ctx.node("ppd_train.pair_writer")
    old = os.umask(0o002)
    try:
        writer.append_pair(ctx.tmp / "set", "p", random_image(1), random_image(2))
    finally:
        os.umask(old)
    assert stat.S_IMODE((ctx.tmp / "set" / "pair_00001_chosen.png").stat().st_mode) == 0o664


def case_picker_line_separator(ctx: Ctx) -> None:
    from helpers import random_image

    from ppd_train.pairs import load_pair_folder

    writer = ctx.node("ppd_train.pair_writer")
    for prompt in ("a fox\u2028in snow", "next\x85line"):
        writer.append_pair(ctx.tmp / "set", prompt, random_image(1), random_image(2))
    assert [p.prompt for p in load_pair_folder(ctx.tmp / "set")] == ["a fox\u2028in snow", "next\x85line"]
    assert writer.count_pairs(ctx.tmp / "set") == 2


# --- round 2: files and config ---
def case_resume_past_max_steps(ctx: Ctx) -> str:
    out = ctx.tmp / "run"
    assert ctx.cli(*ctx.fit_args(out))[0] == 0
    for name in ("adapter.safetensors", "adapter_last.safetensors"):
        (out / name).unlink()  # e.g. a run stopped after its step-3 checkpoint, rerun with a lower budget
    text = cli_refused(ctx, *ctx.fit_args(out, "max_steps=2"))
    assert not (out / "adapter.safetensors").exists(), "an adapter with step-3 weights and a 2-step summary"
    return text


def _tune_with_adapter(ctx: Ctx, adapter: Path) -> str:
    _embedding().save(ctx.tmp / "start.safetensors")
    return cli_refused(ctx, "tune-user", "--stage-c", str(ctx.files / "stage_c"), "--adapter", str(adapter),
                       "--embedding", str(ctx.tmp / "start.safetensors"), "--data", _one_user_data(ctx),
                       "--out", str(ctx.tmp / "tuned.safetensors"), "--quiet", "--steps", "1")


def adapter_meta_case(via_tune: bool = False, training: dict | None = None, **change) -> Callable[[Ctx], str]:
    """An adapter whose metadata was edited (``None`` removes a key; ``training`` is merged into the summary)."""
    def edit(d: dict) -> None:
        d["training"] = {**d.get("training", {}), **(training or {})}
        for key, value in change.items():
            if value is None:
                d.pop(key, None)
            else:
                d[key] = value

    def run(ctx: Ctx) -> str:
        path = _adapter_file(ctx, edit_meta=edit)
        return _tune_with_adapter(ctx, path) if via_tune else refused(lambda: _load_adapter(path))
    return run


def case_adapter_int_tensor(ctx: Ctx) -> str:
    path = _adapter_file(ctx, edit_tensors=lambda t: t.update(token_pos=(t["token_pos"] * 100).to(torch.int32)))
    return refused(lambda: _load_adapter(path))


def _embedding_file(ctx: Ctx, edit_meta=None, edit_tensors=None) -> Path:
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    path = ctx.tmp / "e.safetensors"
    _embedding().save(path)
    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(path)
    d = json.loads(meta["ppd_user_embedding"])
    if edit_meta:
        edit_meta(d)
    if edit_tensors:
        edit_tensors(tensors)
    save_file(tensors, path, metadata={**meta, "ppd_user_embedding": json.dumps(d)})
    return path


def case_embedding_bool_tensor(ctx: Ctx) -> str:
    from ppd_train.embedding import UserEmbedding

    path = _embedding_file(ctx, edit_tensors=lambda t: t.update(tokens=t["tokens"] > 0))
    return refused(lambda: UserEmbedding.load(path))


def case_embedding_no_embedder(ctx: Ctx) -> str:
    from ppd_train.embedding import UserEmbedding

    path = _embedding_file(ctx, edit_meta=lambda d: d.pop("embedder"))
    return refused(lambda: UserEmbedding.load(path))


def case_table_mixed_shapes(ctx: Ctx) -> str:
    from safetensors.torch import load_file, save_file

    from ppd_train.embedding import load_embedding_table, save_embedding_table

    path = ctx.tmp / "t.safetensors"
    save_embedding_table(path, {"a": _embedding(), "b": _embedding(seed=1)})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = dict(f.metadata())
    tensors = load_file(path)
    tensors["user/b"] = tensors["user/b"][:3]  # one user with 3 tokens, the other with 5
    save_file(tensors, path, metadata=meta)
    return refused(lambda: load_embedding_table(path))


def case_write_over_symlink(ctx: Ctx) -> str:
    elsewhere = ctx.tmp / "elsewhere.safetensors"
    elsewhere.write_bytes(b"someone else's file")
    (ctx.tmp / "e.safetensors").symlink_to(elsewhere)
    text = refused(lambda: _embedding().save(ctx.tmp / "e.safetensors"))
    assert (ctx.tmp / "e.safetensors").is_symlink() and elsewhere.read_bytes() == b"someone else's file"
    return text


def case_adapter_is_folder(ctx: Ctx) -> str:
    (ctx.tmp / "a.safetensors").mkdir()
    return refused(lambda: _load_adapter(ctx.tmp / "a.safetensors"))


def case_embedding_is_fifo(ctx: Ctx) -> str:
    from ppd_train.embedding import UserEmbedding

    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    os.mkfifo(ctx.tmp / "e.safetensors")
    return refused(lambda: UserEmbedding.load(ctx.tmp / "e.safetensors"))


def case_adapter_unreadable(ctx: Ctx) -> str:
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp())  # in /tmp, so that another user may reach it
    os.chmod(folder, 0o755)
    path = folder / "a.safetensors"
    shutil.copy(_adapter_file(ctx), path)
    root = os.geteuid() == 0
    os.chmod(path, 0o600 if root else 0)  # not root: even its owner may not read a mode-0 file
    if root:  # root reads every file: read it as nobody, as another user of a shared machine would
        os.seteuid(65534)
    try:
        return refused(lambda: _load_adapter(path))
    finally:
        if root:
            os.seteuid(0)
        shutil.rmtree(folder)


def case_empty_window_sampler(ctx: Ctx) -> str:
    nodes = ctx.node("nodes.adapter_nodes")
    queued = nodes.PPDStageCSampler.VALIDATE_INPUTS(start_percent=0.4, end_percent=0.4)
    assert isinstance(queued, str), queued
    # the same values through links (None at queue time) are refused when the node runs, before anything is sampled
    others = dict.fromkeys(("model", "ppd_adapter", "user_embedding", "positive", "negative", "latent_image"))
    run = dict(others, seed=0, steps=20, cfg=4.0, sampler_name="euler", scheduler="simple", denoise=1.0, weight=1.0,
               start_percent=0.4, end_percent=0.4)
    assert refused(lambda: nodes.PPDStageCSampler().sample(**run)) == queued
    return queued


def case_yaml_alias_bomb(ctx: Ctx) -> str:
    lines = ['a: &a ["x", "x", "x", "x", "x", "x", "x", "x", "x"]']
    lines += [f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, "
              f"*{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}, *{chr(97 + i)}]" for i in range(9)]
    (ctx.tmp / "bomb.yaml").write_text("\n".join(lines) + "\n")  # 9^10 strings once expanded
    return cli_refused(ctx, "fit", "--config", str(ctx.tmp / "bomb.yaml"))


def case_config_unreadable(ctx: Ctx) -> str:
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp())
    os.chmod(folder, 0o755)
    path = folder / "fit.toml"
    path.write_text("lr = 1e-4\n")
    root = os.geteuid() == 0
    os.chmod(path, 0o600 if root else 0)
    if root:  # as another user of a shared machine would find it
        os.seteuid(65534)
    try:
        return cli_refused(ctx, "fit", "--config", str(path))
    finally:
        if root:
            os.seteuid(0)
        shutil.rmtree(folder)


def case_section_checked_at_parse(ctx: Ctx) -> str:
    from ppd_train.config import from_dict
    from ppd_train.synthetic import DemoConfig

    return refused(lambda: from_dict(DemoConfig, {"train": {"t_min": 0.9, "t_max": 0.1}}))


# ------------------------------------------------------------------------------------------------- the catalogue
CASES = [
    # trainer: ppd-train fit
    Case("two-fits-one-out-dir", "a second `fit` on an out_dir another fit is using", "CLI", "refused",
         'Another ppd-train run (pid … on …) is training in …/run; two runs in one out_dir would '
         "overwrite each other's checkpoints and adapter. Wait for it to finish, stop it, or use "
         'another out_dir.', case_lock_busy),
    Case("stale-lock", "a lock left by a fit killed with kill -9", "CLI", "handled",
         "taken over (the lock dies with its process); the fit runs", case_lock_stale),
    Case("lr-inf", "`lr = inf`", "CLI", "refused", 'Config: lr must be a finite number in '
         '(0, 1] (typical: 1e-5). Fix it in the config file or with --set KEY=VALUE.', config_case("lr", "inf")),
    Case("beta-negative", "`beta = -100`", "CLI", "refused", 'Config: beta must be a finite number > 0 (a negative '
         'beta trains towards the rejected images; typical: 2500). Fix it in the config file or with --set KEY=VALUE.',
         config_case("beta", "-100.0")),
    Case("beta-nan", "`beta = nan`", "CLI", "refused", 'Config: beta must be a finite '
         'number > 0 (a negative beta trains towards the rejected images; typical: '
         '2500). Fix it in the config file or with --set KEY=VALUE.', config_case("beta", "nan")),
    Case("log-every-0", "`log_every = 0`", "CLI", "refused", 'Config: log_every must '
         'be >= 1 (steps between log lines). Fix it in the config file or with --set '
         'KEY=VALUE.', config_case("log_every", "0")),
    Case("checkpoint-every-0", "`checkpoint_every = 0`", "CLI", "refused", 'Config: checkpoint_every must be >= 1 '
         '(steps between checkpoints). Fix it in the config file or with --set KEY=VALUE.',
         config_case("checkpoint_every", "0")),
    Case("proj-dim-negative", "`proj_dim = -8`", "CLI", "refused", 'Config: proj_dim must be >= 0 (0 = the Stage C '
         'width). Fix it in the config file or with --set KEY=VALUE.',
         config_case("proj_dim", "-8")),
    Case("weight-decay-nan", "`weight_decay = nan`", "CLI", "refused", 'Config: weight_decay must be a finite number '
         '>= 0. Fix it in the config file or with --set KEY=VALUE.',
         config_case("weight_decay", "nan")),
    Case("out-dir-is-file", "out_dir names a file", "CLI", "refused", 'out_dir …/run exists and is a file, not a '
         'folder; set out_dir to a folder.',
         case_out_dir_file),
    Case("out-dir-unwritable", "out_dir where this user may not create folders", "CLI", "refused",
         'Cannot create out_dir /sys/ppd-run (Operation not permitted); set out_dir to a '
         'folder you can write (--set out_dir=...).', case_out_dir_unwritable),
    Case("disk-full", "the disk fills up during a fit", "CLI", "refused",
         'The disk holding …/run is full: stopped at step 3 (the last checkpoint is step-00000002.safetensors). Rerun '
         'the same command to resume. Free some space first (or lower keep_checkpoints).',
         case_disk_full),
    Case("ctrl-c", "Ctrl+C during a fit", "CLI", "refused",
         'Interrupted: stopped at step … (the last checkpoint is step-….safetensors). Rerun the same '
         'command to resume.', case_ctrl_c),
    Case("rerun-finished-fit", "the same `fit` command again after it finished", "CLI", "handled",
         "nothing is rewritten; it says `already trained to step 3 ... adapter -> ...`", case_finished_rerun),
    Case("summary-never-nan", "a finished fit whose adapter was deleted, rerun", "CLI", "handled",
         "adapter rewritten from the last checkpoint with the same summary; metadata is always valid JSON (never NaN)",
         case_summary_json),
    Case("resume-other-embeddings", "resuming a fit after its embedding table was re-made", "CLI", "refused",
         "…/run/checkpoints/step-00000003.safetensors was trained with other user embeddings (the embedding table "
         "was re-made or changed). Resume with the same table, use another out_dir, or pass --force.",
         case_resume_other_embeddings),
    Case("truncated-newest-checkpoint", "the newest checkpoint cut short (a copy, a disk error)", "CLI", "handled",
         "warning, then resumes from the older checkpoint", case_truncated_newest),
    Case("truncated-only-checkpoint", "the only checkpoint cut short", "CLI", "refused",
         "…/run/checkpoints/step-00000003.safetensors is not a readable safetensors file (…). It may be truncated (an "
         "interrupted download or copy) or not a training checkpoint file at all; delete it and rerun the same "
         "command: the run resumes from the checkpoint before it, or starts over when there is none.",
         case_truncated_only),
    Case("resume-earlier-8bit-state", "resuming an `adamw8bit` fit whose checkpoint holds an earlier PPD's 8-bit "
         "state (square-root codes)", "CLI", "refused",
         "…/run/checkpoints/step-00000003.safetensors: the optimizer state holds exp_avg_codes, exp_avg_scale, "
         "exp_avg_sq_codes, exp_avg_sq_scale, which this version's adamw8bit does not store: 8-bit AdamW moments "
         "from an earlier PPD (their code changed: the second moment is now log-scaled) cannot be continued here. "
         "Finish that run with the version that started it, or train it again from the start (another out_dir, or "
         "--no-resume).", case_resume_earlier_8bit_state),
    Case("adamw8bit-six-decades", "`optimizer = \"adamw8bit\"` on weights whose gradients span six decades inside "
         "one block of 256", "API", "handled",
         "every value steps 0.6x to 1.5x what float32 AdamW steps (measured 0.69x to 1.45x over 1000 steps; the "
         "square-root code of before took up to 5.6x): the second moment is log-scaled per block, so small ones are "
         "kept (docs/performance.md)", case_adamw8bit_six_decades),
    Case("weights-diverge", "an update that makes the adapter's weights NaN/inf", "API", "refused",
         "After step 1 the adapter's weights hold NaN/inf (…); the update diverged. Lower lr "
         '(or beta), then rerun the same command: it resumes from the last checkpoint, which '
         'is intact.', case_weights_diverge),
    Case("dpo-data-bad-index", "a DPO data file whose pairs name a user it does not list", "CLI", "refused",
         "DPO data: 'user_idx' holds entries outside 0..2; the file is damaged. Re-create "
         'it with `ppd-train prepare`.', case_dpo_data_bad_index),
    Case("data-other-stage-c", "DPO data encoded with another text encoder than the Stage C takes", "CLI", "refused",
         '…/data.safetensors was encoded for another model than …/stage_c: CLIP text width '
         '48 (Stage C takes 32), pooled CLIP text width 48 (Stage C takes 32). Use the '
         "Stage C it was prepared for, or re-run `ppd-train prepare` with this model's text "
         'encoder.', case_data_other_stage_c),
    Case("data-other-base", "SDXL DPO data given to `fit` with a Stage C", "CLI", "refused",
         "…/sdxl_data.safetensors holds SDXL data, but …/stage_c is Stage C: latents and text encoded for one base "
         "mean nothing to the other. Re-run `ppd-train prepare` for Stage C, or train on the SDXL model the data was "
         "prepared for.", case_data_other_base),
    Case("two-bases", "`fit` with both `stage_c` and `sdxl` set", "CLI", "refused",
         "Config: set one base model, stage_c or sdxl, not both. Fix it in the config file or with --set KEY=VALUE.",
         case_two_bases),
    Case("prepare-no-encoders", "`prepare` with neither Stage C's encoders nor an SDXL model", "CLI", "refused",
         "prepare needs the base model's encoders: --effnet and --clip-text (Stage C), or --sdxl (an SDXL diffusers "
         "folder or single-file checkpoint, for its VAE and text encoders).", case_prepare_no_encoders),
    Case("sdxl-file-not-sdxl", "a Stable Cascade Stage C single file given as SDXL", "API", "refused",
         "…/stage_c.safetensors looks like a Stable Cascade Stage C checkpoint (give it as stage_c / --stage-c), not "
         "an SDXL checkpoint.", case_sdxl_file_not_sdxl),
    Case("sdxl-file-pickle", "`prepare --sdxl model.ckpt` (a pickled checkpoint)", "CLI", "refused",
         "…/model.ckpt looks like a pickled PyTorch file (.ckpt); Stable Diffusion XL checkpoint files are loaded from "
         ".safetensors only, because pickles can run code. Re-export it as .safetensors.", case_sdxl_file_pickle),
    Case("sdxl-file-sd15", "`prepare --sdxl` with an SD 1.5 single-file checkpoint", "CLI", "refused",
         "…/sd15.safetensors looks like an SD 1.x checkpoint (Stable Diffusion 1.4/1.5 or a fine-tune of it), not an "
         "SDXL checkpoint.", case_sdxl_file_sd15),
    Case("sdxl-file-unet-only", "`prepare --sdxl` with a UNet-only single file (no VAE, no text encoders)", "CLI",
         "refused", "…/unet_only.safetensors has no VAE (first_stage_model.*) and no CLIP-L text encoder "
         "(conditioner.embedders.0.transformer.*) and no OpenCLIP bigG text encoder (conditioner.embedders.1.model.*) "
         "weights. Give the full SDXL checkpoint (as ComfyUI's Load Checkpoint reads it: UNet, VAE and both text "
         "encoders), or a diffusers SDXL folder.", case_sdxl_file_unet_only),
    Case("sdxl-file-missing-weight", "a single-file SDXL checkpoint with one weight missing", "CLI", "refused",
         "…/partial.safetensors: its VAE does not fit the config …/vae/config.json (missing ['encoder.conv_in.bias'])."
         " Give the checkpoint's diffusers folder (or, for the UNet, its config.json) as the SDXL config "
         "(--sdxl-config, sdxl_config); a file missing weights is incomplete: download it again.",
         case_sdxl_file_missing_weight),
    Case("sdxl-file-truncated", "a truncated single-file SDXL checkpoint (an interrupted download)", "CLI", "refused",
         "…/half.safetensors is not a readable safetensors file (SafetensorError: …). It may be truncated (an "
         "interrupted download or copy) or not a Stable Diffusion XL checkpoint file at all; download it again.",
         case_sdxl_file_truncated),
    Case("sdxl-file-no-tokenizer", "`prepare --sdxl <file>` outside ComfyUI without `--sdxl-tokenizer`", "CLI",
         "refused", "A single-file SDXL checkpoint holds no tokenizer: give one with --sdxl-tokenizer: ComfyUI's "
         "comfy/sd1_tokenizer folder, the tokenizer folder of stabilityai/stable-diffusion-xl-base-1.0, or a "
         "diffusers SDXL folder (found by itself when this pack is installed in ComfyUI).",
         case_sdxl_file_no_tokenizer),
    Case("sdxl-file-other-shape", "a single-file checkpoint not shaped like SDXL 1.0, without `--sdxl-config`", "CLI",
         "refused", "…: its VAE does not fit SDXL 1.0's VAE config (missing […]; wrong shape […]). Give the "
         "checkpoint's diffusers folder (or, for the UNet, its config.json) as the SDXL config (--sdxl-config, "
         "sdxl_config); a file missing weights is incomplete: download it again.", case_sdxl_file_other_shape),
    Case("sdxl-folder-with-tokenizer", "`prepare --sdxl <diffusers folder> --sdxl-tokenizer …`", "CLI", "refused",
         "…/sdxl is a diffusers folder, which brings its own configs and tokenizers: the SDXL config and tokenizer "
         "options are for a single-file checkpoint only. Leave them out.", case_sdxl_folder_with_tokenizer),
    Case("adapter-other-base", "a Stage C adapter attached to an SDXL model", "API", "refused",
         "the adapter was made for Stage C custom (4 attention blocks, width 32), but the SDXL model is SDXL custom "
         "(11 attention blocks, width 32/64). Load the model the adapter was trained on, or pick an adapter for this "
         "model.", case_adapter_other_base),
    Case("embed-zero-pairs", "`ppd-train embed --n-pairs 0`", "CLI", "refused", 'ppd-train embed: error: argument '
         '--n-pairs: must be >= 1, got 0',
         case_embed_zero_pairs),
    Case("eval-out-unwritable", "`eval` writing its metrics where this user may not write", "CLI", "refused",
         'Permission denied: /sys/ppd-metrics.json. Choose a location you can write, or '
         'fix its permissions.', case_eval_out_unwritable),
    Case("log-never-nan", "steps whose loss is NaN, in train_log.jsonl", "API", "handled",
         "logged as null: every line stays valid JSON (so do metrics.json and every file's metadata)",
         case_log_never_nan),
    Case("stage-c-bin-only", "a diffusers Stage C folder holding only `.bin`", "CLI", "refused",
         '…/stage_c_bin has no .safetensors weights (it has diffusion_pytorch_model.bin: pickled '
         'weights, which can run code); PPD loads Stage C weights from safetensors only. Download the '
         '.safetensors version of the model, or convert it once with a tool you trust.', case_bin_only),
    # tune-user
    Case("tune-several-users", "`tune-user --data` holding several users, no `--user`", "CLI", "refused",
         "The pairs hold 3 users (seen00, seen01, seen02...); say which one to tune with --user.",
         case_tune_several_users),
    Case("tune-user-two-folders", "`tune-user --pairs a b`, both folders holding user `ann`", "CLI", "refused",
         "User 'ann' is in both …/a and …/b: PPD would take two people for one (or count one person's pairs twice). "
         "Give one of them another user_id (or rename its folder), or pass --merge-users if both hold the same "
         "person's pairs.", case_tune_user_in_two_folders),
    Case("tune-out-exists", "`tune-user --out` naming an existing file (it stays untouched)", "CLI", "refused",
         "…/tuned.safetensors exists; choose another --out, or pass --force to replace it.",
         case_tune_out_exists),
    Case("tune-no-start", "`tune-user` with neither `--embedding` nor `--library`", "CLI", "refused",
         "tune-user needs a start: a user embedding (--embedding), a library of user embeddings (--library), or "
         "both.", case_tune_no_start),
    Case("tune-mix-no-library", "`tune-user --mode mix` without `--library`", "CLI", "refused",
         "tune-user: mode mix mixes library users; give --library, or use mode tokens.",
         case_tune_mix_without_library),
    Case("tune-other-embedder", "`tune-user` starting from another embedder's embedding", "CLI", "refused",
         "the starting embedding (5 tokens x 24 from embedder 'another-embedder') does not fit the adapter, which "
         "reads 5 tokens x 24 from embedder 'test'. Re-embed the user with the embedder the adapter was trained "
         "with.", case_tune_other_embedder),
    Case("tune-images-no-encoders", "`tune-user --pairs` (images) without `--effnet` / `--clip-text`", "CLI",
         "refused", "--pairs are images: give --effnet and --clip-text too, the encoders `ppd-train prepare` uses (or "
         "pass a prepared --data file).", case_tune_images_without_encoders),
    Case("tune-node-sdxl-stage-c-vae", "Tune User Embedding on SDXL with a Stable Cascade VAE connected", "node",
         "refused", "The VAE is not an SDXL VAE (it makes 16-channel latents, not SDXL's 4 channels at 1/8 of the "
         "image size). Connect the VAE output of the SDXL checkpoint's Load Checkpoint (or a Load VAE of an SDXL VAE), "
         "not a Stable Cascade or other VAE.", case_tune_sdxl_stage_c_vae),
    Case("tune-node-sdxl-other-clip", "Tune User Embedding on SDXL with another model's CLIP (Stage C's CLIP-G)",
         "node", "refused", "The CLIP gives text of width 1280 (pooled 1280), but the connected SDXL model reads 2048 "
         "(pooled 1280). Connect the CLIP of the same checkpoint as the MODEL (Load Checkpoint's CLIP output).",
         case_tune_sdxl_other_clip),
    Case("tune-node-sdxl-layout", "Tune User Embedding on an SDXL-like MODEL of another UNet layout (a middle block "
         "shallower than the last level)", "node", "refused", "Tune User Embedding supports SDXL's UNet layout (SDXL "
         "1.0 and its fine-tunes); this MODEL's structure differs. Connect the SDXL checkpoint the adapter was "
         "trained on.", case_tune_sdxl_layout),
    # files
    Case("temp-of-killed-save", "a writer killed while saving (temporary file left)", "API", "handled",
         "the next save of that file removes the dead writer's temporary", case_temp_from_killed_save),
    Case("umask", "files written under umask 022", "API", "handled",
         "mode 0644 (the umask applies; no forced 0600)", case_umask),
    Case("adapter-nan", "an adapter file with NaN/inf weights", "node", "refused",
         "…/a.safetensors: the adapter's weights hold NaN/inf (blocks.0.to_v.weight); it would "
         'turn every image into noise. It comes from a training run that diverged: train it again '
         'with a lower lr or beta.', case_adapter_nan),
    Case("adapter-huge-metadata", "adapter metadata `num_tokens = 1e9`", "node", "refused",
         '…/a.safetensors: adapter metadata is incomplete or damaged (num_tokens = '
         '1000000000 is not a whole number between 1 and 4096). The file was edited or '
         'damaged; export it again with ppd-train.', case_adapter_huge_meta),
    Case("adapter-extra-tensor", "an adapter with one extra tensor", "node", "refused", '…/a.safetensors: tensors do '
         "not match the adapter's own metadata (unexpected ['extra']). The file is damaged or was edited; export it "
         'again.',
         case_adapter_extra_tensor),
    Case("adapter-truncated", "a truncated adapter file", "node", "refused", '…/a.safetensors is not a readable '
         'safetensors file (SafetensorError: Error while deserializing header: incomplete metadata, file not fully '
         'covered). It may be truncated (an interrupted download or copy) or not a PPD adapter file at all; download '
         'or export it again.',
         case_adapter_truncated),
    Case("adapter-pickle", "an adapter as `.ckpt` / `.pt`", "node", "refused", '…/adapter.ckpt looks like a pickled '
         'PyTorch file (.ckpt); PPD adapter files are loaded from .safetensors only, because pickles can run code. '
         'Re-export it as .safetensors.',
         case_adapter_pickle),
    Case("adapter-other-stage-c", "an adapter made for another Stage C size", "node", "refused",
         "adapter 'a' was made for Stage C custom (4 attention blocks, width 32), but "
         'the Stage C model is Stage C lite (32 attention blocks, width 1536). Load the '
         'Stage C checkpoint the adapter was trained on (lite vs full), or pick an '
         'adapter for this model.', case_adapter_other_stage_c),
    Case("embedding-other-embedder", "a user embedding from another embedder", "node", "refused",
         "the user embedding (5 tokens x 24 from embedder 'vlm:other:direct:all') "
         "does not fit the adapter, which reads 5 tokens x 24 from embedder 'test'. "
         'Re-embed the user with the embedder the adapter was trained with.', case_embedding_other_embedder),
    Case("embedding-nan", "a user-embedding file holding inf", "node", "refused", '…/e.safetensors: User embedding '
         "from 'test' contains NaN or infinite values; re-embed the user (check the VLM runs in a dtype your device "
         'supports).',
         case_embedding_nan),
    Case("vlm-layer-twice", "VLM layers `-1,28` on a 29-state VLM (one layer twice)", "node", "refused",
         'Layer 28 is the same hidden state as an earlier one in [-1, 28]; list each layer once.', case_layers_twice),
    # images
    Case("junk-png-600mb", "a 600 MB junk `.png` in a pair folder", "node", "refused",
         'u/pairs.jsonl line 1 (chosen): …/u/good_0.png is 600 MB, more than any preference '
         'image needs (at most 256 MB); downscale or replace it.', case_junk_png_600mb),
    Case("junk-png", "a corrupt image in a pair folder", "node", "refused",
         'u/pairs.jsonl line 1 (chosen): …/u/good_0.png is not a readable image (OSError: '
         'Truncated File Read). Replace the file or remove this pair.', case_junk_png_small),
    Case("huge-image", "a 72-megapixel image", "node", "refused", 'u/pairs.jsonl line 1 (chosen): '
         'image is 9000x8000, larger than PPD accepts (64 Mpx). Downscale it first.', case_huge_pixels),
    # pair folders
    Case("duplicate-rows", "the same row twice in pairs.jsonl", "node", "refused", 'u/pairs.jsonl line 2 repeats '
         'pairs.jsonl line 1 (same prompt and images); a repeated pair would count twice. Delete one of them.',
         pair_case(row(), row())),
    Case("chosen-is-rejected", "chosen and rejected the same path", "node", "refused", 'u/pairs.jsonl line 1: '
         "'chosen' and 'rejected' are the same image ('good_0.png', 'good_0.png'); a pair needs two different images. "
         'Fix or delete the row.',
         pair_case(row(rejected="good_0.png"))),
    Case("chosen-is-rejected-dot", "chosen `x.png`, rejected `./x.png`", "node", "refused", 'u/pairs.jsonl line 1: '
         "'chosen' and 'rejected' are the same image ('good_0.png', './good_0.png'); a pair needs two different "
         'images. Fix or delete the row.',
         pair_case(row(rejected="./good_0.png"))),
    Case("chosen-same-bytes", "chosen and rejected two files with the same bytes", "node", "refused",
         "u/pairs.jsonl line 1: 'chosen' and 'rejected' are the same image ('good_0.png', "
         "'copy.png'); a pair needs two different images. Fix or delete the row.", case_same_bytes),
    Case("prompt-null", "`\"prompt\": null`", "node", "refused", 'u/pairs.jsonl line 1: '
         "'prompt' is None; give the prompt the two images were made for.", pair_case(row(prompt=None))),
    Case("path-not-text", "`\"chosen\": 3`", "node", "refused",
         'u/pairs.jsonl line 1: image path must be text, got 3; use a path relative to the pair folder …/u.',
         pair_case(row(chosen=3))),
    Case("path-nul", "a NUL character in an image path", "node", "refused", 'u/pairs.jsonl '
         "line 1: image path 'good\\x00.png' contains a NUL character, "
         'which no file name can hold; use a path relative to the pair '
         'folder …/u.', pair_case(row(chosen="good\x00.png"))),
    Case("path-climbs-out", "an image path `../../etc/passwd`", "node", "refused", 'u/pairs.jsonl '
         "line 1: image path '../../etc/passwd' points outside …/u; "
         'use a path relative to the pair folder …/u.', pair_case(row(chosen="../../etc/passwd"))),
    Case("both-pair-files", "a pair folder with both pairs.jsonl and pairs.csv", "node", "refused",
         '…/u has both pairs.jsonl and pairs.csv; PPD would read only one of them. Keep one '
         '(merge the rows into it) and delete the other.', case_both_pair_files),
    Case("exif-rotated", "a photo whose EXIF says it is rotated", "node", "handled",
         "turned upright, as image viewers show it", case_exif_rotated),
    Case("csv-bom", "pairs.csv saved by Excel as 'CSV UTF-8' (with a BOM)", "node", "handled",
         "read as UTF-8; the BOM is dropped", case_csv_bom),
    Case("csv-cp1252", "pairs.csv saved by Excel on Windows (cp1252)", "node", "handled",
         "read as Windows-1252 when it is not UTF-8", case_csv_cp1252),
    Case("csv-short-row", "a pairs.csv row with a missing column", "node", "refused",
         '…/u/pairs.csv row 2 has 2 field(s) but the header has 3 (prompt, chosen, rejected); '
         'quote fields that contain commas, and give every row all columns.', case_csv_short_row),
    Case("symlinks", "a symlink inside a pair or model folder pointing elsewhere", "node", "handled",
         "followed, in every PPD folder alike (as ComfyUI does); names from files may not climb out",
         case_symlinks),
    # Pick-a-Pic
    Case("pickapic-nan-label", "a Pick-a-Pic row with a NaN label", "API", "handled",
         "dropped as unlabeled (never counted as a jpg_1 win)", case_pickapic_nan_label),
    Case("pickapic-same-bytes", "identical image bytes, no `are_different` column", "API", "handled",
         "dropped: no preference", case_pickapic_same_bytes),
    Case("pickapic-duplicate", "the same comparison twice for one user", "API", "handled",
         "kept once", case_pickapic_duplicate),
    Case("pickapic-corrupt-image", "a corrupt image in a Pick-a-Pic row", "API", "handled",
         "row skipped and reported with the file's row and the user; other rows load", case_pickapic_corrupt),
    Case("pickapic-unknown-user", "a `user_id` not in the shard", "node", "refused",
         'User 99 is not in train-00000.parquet (it holds 2 users, for example 7, 8). '
         'Check the user_id, or pick the shard that holds this user.', case_pickapic_unknown_user),
    Case("pickapic-only-ties", "a user whose rows are all ties", "node", "refused", 'User 9 has no usable pairs in '
         'train-00000.parquet: every row of this user is a tie, unlabeled, shows the same image twice, has no caption, '
         'is contradicted by another row, or has an unreadable image. Pick another user.',
         case_pickapic_only_ties),
    Case("pickapic-row-numbers", "a pair of a user found after filtering by user", "API", "handled",
         "named by the file's own row number", case_pickapic_row_numbers),
    Case("embed-unreadable-user", "one user's image cut short, in `ppd-train embed`", "CLI", "handled",
         "that user is skipped and listed; every other user is embedded", case_embed_skips_unreadable),
    # nodes
    Case("start-after-end", "`start_percent` 0.8 > `end_percent` 0.2", "node", "refused",
         'start_percent (0.8) is after end_percent (0.2): the '
         'user would never count. Make start_percent <= '
         'end_percent (0 and 1 = the whole run).', strength_case(start_percent=0.8, end_percent=0.2)),
    Case("weight-nan", "adapter `weight` NaN (through a link)", "node", "refused", "'weight' must be a finite number, "
         "got nan. Give it a number from 0 to 3 (a linked value skips ComfyUI's own range check).",
         strength_case(weight=float("nan"))),
    Case("weight-huge", "adapter `weight` 1e30 (through a link)", "node", "refused",
         "'weight' must be between 0 and 3, got 1e+30. Give it a number from 0 to 3 (a "
         "linked value skips ComfyUI's own range check).", strength_case(weight=1e30)),
    Case("interpolate-nan", "Embedding Interpolate `weight` NaN", "node", "refused",
         'Interpolation weight must be a finite number, got nan. Use 0 (user A) to 1 '
         '(user B).', case_interpolate(float("nan"))),
    Case("interpolate-huge", "Embedding Interpolate `weight` 1e30", "node", "refused",
         'Interpolation weight must be between 0 and 1, got 1e+30. Use 0 (user A) to 1 (user '
         'B).', case_interpolate(1e30)),
    Case("mix-nan", "Embedding Mix weight NaN", "node", "refused", 'Mix weight 1 must be a finite number, got nan. '
         'Give each user a share >= 0.',
         case_mix_nan),
    Case("mix-huge", "Embedding Mix weights 1e300 and 3e300", "node", "handled",
         "the same blend as 1 and 3 (no overflow, no all-zero user)", case_mix_huge),
    Case("image-batch-nan", "an IMAGE batch holding NaN (Preference Pairs From Images)", "node", "refused",
         'The IMAGE batch holds NaN/inf values (a node upstream produced them); fix that node, '
         'or load the images from files.', case_image_batch_nan),
    Case("node-nul-name", "a NUL character in a file name from a workflow", "node", "refused",
         "File name 'a\\x00.safetensors' contains a NUL character, which no file name can hold; only "
         "files inside ComfyUI's own folders can be used: move the file there and pick it from the "
         'list.', case_node_nul),
    Case("node-climb-name", "a file name `../../secret.safetensors` from a workflow", "node", "refused",
         "File name '../../secret.safetensors' points outside …; only files inside ComfyUI's own "
         'folders can be used: move the file there and pick it from the list.', case_node_climb),
    Case("long-save-prefix", "a 300-character save prefix", "node", "refused", 'File name prefix is too long (300 '
         'characters, one name); file systems refuse longer names. Keep each folder or file name under 200 characters '
         'and the whole prefix under 1000.',
         case_long_prefix),
    # --- round 2: data ---
    Case("embed-other-dataset", "`ppd-train embed` rerun on another dataset with the same `--out` (after a kill)",
         "CLI", "handled", "the table holds the new dataset's users only, each embedded from its own pairs (cached "
         "parts are keyed by each user's pairs; unchanged users are reused)", case_embed_other_dataset),
    Case("user-in-two-folders", "two pair folders holding the same user id", "CLI", "refused",
         "User 'anna' is in both …/one and …/two: PPD would take two people for one (or count one person's pairs "
         "twice). Give one of them another user_id (or rename its folder), or pass --merge-users if both hold the "
         "same person's pairs.", case_user_in_two_folders),
    Case("source-twice", "the same pair folder given twice (`ann ./ann`)", "CLI", "refused",
         "…/ann is given twice (also as …/ann); its pairs would count twice. Give each pair folder or shard once.",
         case_source_twice),
    Case("user-id-types", "Pick-a-Pic user ids `3`, `3.0` and `\"3\"` (int, float, text columns)", "CLI", "handled",
         "one user `3`: whole numbers are written as integers, whatever the column type", case_user_id_types),
    Case("user-id-fractional", "a Pick-a-Pic user id `3.5`", "API", "refused",
         "…/s.parquet column 'user_id': user id 3.5 names no user; use text or a whole number (a fractional or "
         "boolean id comes from a broken column or converter: fix the file).", case_user_id_fractional),
    Case("user-id-null", "a Pick-a-Pic row with a null user id", "API", "handled",
         "row skipped and reported (never a user called `None`)", case_user_id_null),
    Case("empty-parquet", "a Pick-a-Pic shard with no rows", "CLI", "refused",
         "…/train-00000.parquet holds no rows (an empty shard); remove it from the sources or use a shard with data.",
         case_empty_parquet),
    Case("prompt-u2028", "a prompt holding U+2028 or U+0085 (written raw by the picker)", "node", "handled",
         "loads intact: JSONL lines are split on `\\n` only", case_prompt_u2028),
    Case("pickapic-null-caption", "a Pick-a-Pic row with a null or blank caption", "API", "handled",
         "row skipped and reported, like other rows that carry no preference", case_pickapic_null_caption),
    Case("pickapic-reversed", "A over B, then B over A (same user and caption) in Pick-a-Pic", "API", "handled",
         "both rows dropped and reported, in any row order", case_pickapic_reversed),
    Case("reversed-row", "A over B, then B over A (same prompt) in pairs.jsonl", "node", "refused",
         "u/pairs.jsonl line 2 reverses pairs.jsonl line 1 (same prompt and images, the other image preferred): the "
         "two cancel out and say nothing of the user. Delete the wrong one, or both.",
         pair_case(row(), row(chosen="bad_0.jpg", rejected="good_0.png"))),
    Case("image-is-folder", "an image path naming a folder", "node", "refused",
         "u/pairs.jsonl line 1: image 'sub' in …/u is a folder, not a file; name an image file.",
         case_image_is_folder),
    Case("pair-file-fifo", "pairs.jsonl is a FIFO", "node", "refused", "…/u/pairs.jsonl is not a regular file (a "
         "FIFO, socket or device); the pair file must be a plain text file.", case_pair_file_fifo),
    Case("image-too-narrow", "a 3000x10 image (under 8 px once downscaled)", "node", "refused",
         "u/pairs.jsonl line 1 (chosen): image is 3000x10, too narrow for its length: scaled to 1536 px on its long "
         "side it would be 1536x5 (< 8 px). Crop it to a less extreme aspect ratio.", case_image_too_narrow),
    Case("embed-mixed-shapes", "embedding parts of two token shapes in one `embed` run", "CLI", "refused",
         "…/part-000-000001.safetensors: user b's embedding is (2, 5) tokens x width, the others' (2, 3): the "
         "embedder changed shape within one run. Delete …/t.safetensors.parts and embed again.",
         case_embed_mixed_shapes),

    # --- round 2: picker ---
    Case("picker-route-big-body", "a body over 64 KiB POSTed to `/ppd/picker/choose` (e.g. a 10 MiB `request_id`)",
         "route (HTTP 413)", "refused", f"request body over 65536 bytes; {ROUTE_USAGE}", case_route_big_body),
    Case("picker-route-long-id", "a 60 KB `request_id` (under the body limit)", "route (HTTP 400)", "refused",
         "request_id must be the 32 hexadecimal digits of an open question, as GET /ppd/picker/pending lists them",
         case_route_long_id),
    Case("picker-route-unknown-id", "a `request_id` of no open question", "route (HTTP 404)", "refused",
         "no open preference question has this request_id (already answered, cancelled or timed out); GET "
         "/ppd/picker/pending lists the open ones", case_route_unknown_id),
    Case("picker-route-deep-json", "60 000 nested `[` as the body", "route (HTTP 400)", "refused",
         f"the body is not JSON; {ROUTE_USAGE}", case_route_deep_json),
    Case("picker-set-deep", "a pair set name 400 folders deep", "node", "refused",
         "pair_set '…' is 400 folders deep; a pair set is one folder, or one folder inside another (at most 2 "
         "levels, e.g. 'anna/portraits').", case_pair_set_deep),
    Case("picker-set-long", "a 300-character pair set name", "node", "refused",
         "pair_set '…' has a folder name longer than 100 bytes; use a shorter name such as 'my_pairs'.",
         case_pair_set_long),
    Case("picker-set-images", "an existing folder of images (no pairs.jsonl) as the pair set", "node", "refused",
         "pair_set 'photos': …/photos already exists and holds other files (holiday.png) but no pairs.jsonl, so it "
         "is not a pair set; the picker will not turn it into one. Choose a new name (the folder is created) or an "
         "existing pair set.", case_pair_set_images),
    Case("picker-set-symlink", "a pair set through a symlink already inside input/", "node", "refused",
         "pair_set 'linked/set': …/linked is a symbolic link; the picker writes only into real folders inside the "
         "input folder, never through a link. Choose another name, or replace the link with a folder.",
         case_pair_set_symlink),
    Case("picker-set-absolute", "a pair set given as an absolute path inside input/", "node", "handled",
         "that pair set (the same as its name relative to input/)", case_pair_set_absolute),
    Case("node-absolute-inside", "an absolute file name that lies inside a model folder", "node", "handled",
         "accepted, looked for in the folder it lies in (an absolute path elsewhere: 'is an absolute path outside "
         "the folders for …')", case_node_absolute_inside),
    Case("picker-timeout", "no browser tab answers the Preference Picker", "node", "refused",
         "No choice came within 600 seconds for pair 1 of 1 (Preference Picker, pair set 'my_pairs'); nothing was "
         "saved for it. Open ComfyUI in a browser tab to answer (the picker shows there), or answer from a script: "
         'GET /ppd/picker/pending, then POST /ppd/picker/choose {"request_id": ..., "choice": "A" | "B" | "skip"}. '
         "Raise timeout_s to wait longer.", case_picker_timeout),
    Case("picker-umask", "picker PNGs written under umask 002", "node", "handled",
         "0664 (0666 less the umask, like any file), written atomically", case_picker_umask),
    Case("picker-line-separator", "a picker prompt holding U+2028 or U+0085", "node", "handled",
         "escaped in pairs.jsonl: one row per pair, read back as typed", case_picker_line_separator),
    # --- round 2: files and config ---
    Case("resume-past-max-steps", "`fit` resumed with `max_steps` below the checkpoint's step", "CLI", "refused",
         'The checkpoint in …/run/checkpoints is at step 3 > max_steps 2: its weights have 3 steps of training, and an '
         'adapter written now would hold them under a summary of 2. Set max_steps >= 3 to finish this run from there, '
         'or use another out_dir (or --no-resume) to train 2 steps from the start.', case_resume_past_max_steps),
    Case("adapter-beta-negative", "an adapter whose metadata says it was trained with `beta = -100`, to `tune-user`",
         "CLI", "refused", 'a.safetensors: adapter metadata is incomplete or damaged (training.beta = -100.0 is not a '
         'finite number > 0). The file was edited or damaged; export it again with ppd-train.',
         adapter_meta_case(via_tune=True, training={"beta": -100.0})),
    Case("adapter-beta-text", 'adapter metadata `beta = "high"`', "node", "refused",
         "a.safetensors: adapter metadata is incomplete or damaged (training.beta = 'high' is not a finite number > "
         "0).", adapter_meta_case(training={"beta": "high"})),
    Case("adapter-no-embedder", "an adapter file without `embedder` metadata", "node", "refused",
         "a.safetensors: the PPD adapter does not say which embedder made its tokens (metadata 'embedder' is None): "
         "the file is damaged or was edited. Export it again with PPD.", adapter_meta_case(embedder=None)),
    Case("adapter-format-version-null", "adapter metadata `format_version: null`", "node", "refused",
         "a.safetensors: the PPD adapter's format_version is None, not a whole number >= 1: the file is damaged or "
         "was edited. Export it again with PPD.", adapter_meta_case(format_version=None)),
    Case("adapter-block-heads-0", "adapter metadata `block_heads` holding 0", "node", "refused",
         "a.safetensors: adapter metadata is incomplete or damaged (block_heads[0] = 0 is not a whole number between 1 "
         "and 65536).", adapter_meta_case(block_heads=[0, 2, 2, 2])),
    Case("adapter-int-tensor", "an adapter file holding an int32 weight", "node", "refused",
         "a.safetensors: tensor 'token_pos' (int32) is not floating point; a PPD adapter holds float weights only (an "
         "integer tensor would be silently rounded into one).", case_adapter_int_tensor),
    Case("embedding-bool-tensor", "a user-embedding file whose tokens are booleans", "node", "refused",
         "e.safetensors: tensor 'tokens' (bool) is not floating point; a user embedding holds float weights only",
         case_embedding_bool_tensor),
    Case("embedding-no-embedder", "a user-embedding file without `embedder` metadata", "node", "refused",
         "e.safetensors: the PPD user embedding does not say which embedder made its tokens (metadata 'embedder' is "
         "None): the file is damaged or was edited.", case_embedding_no_embedder),
    Case("table-mixed-shapes", "an embedding table whose users have different token counts", "CLI", "refused",
         "t.safetensors: Cannot mix user embedding (5 x 24, embedder 'test') with user embedding (3 x 24, embedder "
         "'test'): they come from different embedders or layers.", case_table_mixed_shapes),
    Case("write-over-symlink", "saving a user embedding to a name that is a symbolic link", "node", "refused",
         "e.safetensors is a symbolic link (to …elsewhere.safetensors); PPD does not write over or through links. "
         "Remove the link or choose another file name.", case_write_over_symlink),
    Case("adapter-is-folder", "a folder given as the adapter file", "node", "refused",
         "a.safetensors is a folder, not a PPD adapter file. Give the file inside it.", case_adapter_is_folder),
    Case("embedding-is-fifo", "a FIFO (named pipe) given as the user-embedding file", "node", "refused",
         "e.safetensors is not a regular file (a pipe, socket or device); give a user embedding file.",
         case_embedding_is_fifo),
    Case("adapter-unreadable", "an adapter file of another user, mode 0600", "node", "refused",
         "Cannot read PPD adapter file …/a.safetensors: permission denied (reading it, not writing). Make it readable "
         "for this user (chmod/chown), or copy it somewhere this user can read.", case_adapter_unreadable),
    Case("empty-window", "Apply PPD Adapter with `start_percent` = `end_percent` = 0.4", "node", "refused",
         "start_percent and end_percent are both 0.4: an empty window, so the user would never count and the node "
         "would change nothing. Make start_percent < end_percent (0 and 1 = the whole run), or set weight 0 to sample "
         "without the user.", strength_case(start_percent=0.4, end_percent=0.4)),
    Case("empty-window-sampler", "PPD Stage C Sampler with `start_percent` = `end_percent` = 0.4", "node", "refused",
         "start_percent and end_percent are both 0.4: an empty window", case_empty_window_sampler),
    Case("max-epochs-huge", "`max_epochs = 1e308`", "CLI", "refused", "Config key 'max_epochs' must be at most 1e+06, "
         "got 1e+308. Fix it in the config file or with --set max_epochs=VALUE.",
         config_case("max_epochs", "1e308")),
    Case("seed-huge", "`seed = 99999999999999999999999`", "CLI", "refused", "Config key 'seed' must be between 0 and "
         "1e+08, got 99999999999999999999999.", config_case("seed", "99999999999999999999999")),
    Case("val-draws-huge", "`val_draws = 1000000000000`", "CLI", "refused", "Config key 'val_draws' must be at most "
         "1024, got 1000000000000.", config_case("val_draws", "1000000000000")),
    Case("batch-size-huge", "`batch_size = 100000000`", "CLI", "refused", "Config key 'batch_size' must be at most "
         "65536, got 100000000.", config_case("batch_size", "100000000")),
    Case("token-noise-negative", "`token_noise = -1`", "CLI", "refused", "Config key 'token_noise' must be between 0 "
         "and 100, got -1.0.", config_case("token_noise", "-1")),
    Case("sweep-world-too-many-styles", "`demo --sweep` on SDXL with a world of 6 styles (SDXL latents have 4 "
         "channels)", "CLI", "refused", "sweep world 'rich': world.k_styles = 6: k_styles must be <= 4, the latent "
         "channels of SDXL (one style direction per channel at most); use world.k_styles <= 4 or world.base = "
         "\"stage_c\" (16 channels).", case_sweep_world_too_many_styles),
    Case("section-checked-at-parse", "`demo` config with `[train] t_min = 0.9, t_max = 0.1`", "API", "refused",
         "In section [train] (keys train.KEY): Config: need 0 <= t_min < t_max <= 1.", case_section_checked_at_parse),
    Case("yaml-alias-bomb", "a YAML config whose nested aliases expand to billions of strings", "CLI", "refused",
         "bomb.yaml: YAML aliases (*name) are not allowed in a config (nested aliases can expand to gigabytes); "
         "write the values out.", case_yaml_alias_bomb),
    Case("config-unreadable", "a config file of another user, mode 0600", "CLI", "refused",
         "Cannot read config file …/fit.toml: permission denied (reading it, not writing). Make it readable for this "
         "user (chmod/chown).", case_config_unreadable),
]


def matches(template: str, text: str) -> bool:
    """``text`` holds ``template``'s parts in order; ``…`` stands for what varies (paths, pids, step numbers)."""
    pos = 0
    for part in template.split("\u2026"):
        found = text.find(part, pos)
        if found < 0:
            return False
        pos = found + len(part)
    return True


def test_matches():
    assert matches("a … c", "x a b c") and not matches("a … c", "c a")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from ppd_train.embedding import save_embedding_table
    from ppd_train.synthetic import World, WorldConfig, build_dataset
    from ppd_train.tiny import build_tiny_stage_c

    folder = tmp_path_factory.mktemp("fit")
    world = World(WorldConfig(seen_users=3, unseen_users=1, unseen_mixtures=0, pairs_per_user=4), seed=0)
    data, embeddings, _ = build_dataset(world, seed=0)
    data.save(folder / "data.safetensors")
    save_embedding_table(folder / "users.safetensors", embeddings)
    build_tiny_stage_c(seed=0).save_pretrained(folder / "stage_c")
    return folder


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case, tmp_path, capsys, monkeypatch, files, pack):
    monkeypatch.chdir(tmp_path)
    result = case.run(Ctx(tmp_path, capsys, monkeypatch, files, pack))
    if case.outcome == "refused":
        assert isinstance(result, str) and matches(case.message, result), result
        assert "Traceback" not in result
    else:
        assert case.outcome == "handled" and result is None


def render() -> str:
    def cell(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "# Bad inputs: what PPD answers",
        "",
        "Every row is a test (`tests/test_bad_inputs.py`, the single list new cases are added to; this file is",
        "rendered from it by `python tests/test_bad_inputs.py`, and a test keeps the two equal). *Refused*: the",
        "command or node stops with the message shown (`…` stands for a path, pid or number), naming the file or",
        "field and the fix. In ComfyUI it is the node's error (or the queue-time error of `VALIDATE_INPUTS`); in",
        "`ppd-train` one line on stderr and exit status 2 (130 for Ctrl+C), never a traceback. *Handled*: the input is",
        "valid or recoverable, and the result is right.",
        "",
        f"{sum(c.outcome == 'refused' for c in CASES)} refused, {sum(c.outcome == 'handled' for c in CASES)} handled.",
        "",
        "| input | where | outcome | message / result |",
        "| --- | --- | --- | --- |",
    ]
    lines += [f"| {cell(c.input)} | {c.where} | {c.outcome} | {cell(c.message)} |" for c in CASES]
    return "\n".join(lines) + "\n"


def test_catalogue_doc_matches_the_cases():
    assert len({c.id for c in CASES}) == len(CASES)
    assert DOC.read_text() == render(), "docs/bad-inputs.md is out of date: run python tests/test_bad_inputs.py"


if __name__ == "__main__":
    DOC.write_text(render())
    print(f"{len(CASES)} cases -> {DOC}")
