"""``ppd-train fit``: train the PPD adapter on many users at once with the user-conditioned Diffusion-DPO loss.

Exact resume needs no random-state bookkeeping: the data order is a function of (seed, epoch) and all per-step noise
comes from a generator seeded by (seed, step, micro-batch, process). A checkpoint therefore only holds the adapter,
the optimizer, the scheduler and the data cursor — as safetensors, written atomically.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .adapter import AdapterConfig, PPDAdapter, save_adapter
from .checkpoint import load_latest, prune_checkpoints, save_checkpoint
from .dpo_data import DPOData
from .errors import PPDError
from .guards import check_finite_parameters
from .loss import dpo_loss
from .schedule import add_noise
from .stage_c import PPDBinding, clip_image_dim, stage_c_info

# Keys that may change between a run and its resume without changing the result.
RESUME_FREE_KEYS = {"out_dir", "max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "val_every",
                    "tensorboard"}


@dataclass
class TrainConfig:
    config_version: int = 1
    seed: int = 0
    stage_c: str = ""  # diffusers folder or Stability single-file .safetensors
    stage_c_config: str = ""  # diffusers config.json, only for single files of non-standard size
    data: str = ""  # DPO data file (see dpo_data.py)
    embeddings: str = ""  # embedding table from `ppd-train embed`
    out_dir: str = "runs/ppd"
    proj_dim: int = 0  # width of the shared user projector (0 = Stage C width)
    max_steps: int = 2000  # optimizer steps
    batch_size: int = 16  # pairs per micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    beta: float = 2500.0  # diffusers convention: -log sigmoid(-beta * diff); Salesforce's beta 5000 with 0.5
    user_dropout: float = 0.1  # share of pairs trained with a zeroed user embedding
    t_min: float = 0.0
    t_max: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    val_fraction: float = 0.05
    val_every: int = 250
    log_every: int = 10
    tensorboard: bool = True
    max_nan_steps: int = 5  # consecutive non-finite losses before the run stops

    def validate(self) -> None:
        fin = math.isfinite
        checks = [(self.max_steps > 0, "max_steps must be > 0"), (self.batch_size > 0, "batch_size must be > 0"),
                  (self.grad_accum > 0, "grad_accum must be > 0"),
                  (fin(self.lr) and 0 < self.lr <= 1, "lr must be a finite number in (0, 1] (typical: 1e-5)"),
                  (fin(self.beta) and self.beta > 0,
                   "beta must be a finite number > 0 (a negative beta trains towards the rejected images; "
                   "typical: 2500)"),
                  (fin(self.weight_decay) and self.weight_decay >= 0, "weight_decay must be a finite number >= 0"),
                  (fin(self.max_grad_norm) and self.max_grad_norm >= 0,
                   "max_grad_norm must be a finite number >= 0 (0 = no clipping)"),
                  (self.proj_dim >= 0, "proj_dim must be >= 0 (0 = the Stage C width)"),
                  (self.warmup_steps >= 0, "warmup_steps must be >= 0"),
                  (self.log_every >= 1, "log_every must be >= 1 (steps between log lines)"),
                  (self.checkpoint_every >= 1, "checkpoint_every must be >= 1 (steps between checkpoints)"),
                  (self.val_every >= 0, "val_every must be >= 0 (0 = no validation)"),
                  (self.max_nan_steps >= 1, "max_nan_steps must be >= 1"),
                  (0 <= self.user_dropout < 1, "user_dropout must be in [0, 1)"),
                  (0 <= self.t_min < self.t_max <= 1, "need 0 <= t_min < t_max <= 1"),
                  (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
                  (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no, bf16 or fp16"),
                  (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")]
        for ok, msg in checks:
            if not ok:
                raise PPDError(f"Config: {msg}. Fix it in the config file or with --set KEY=VALUE.")

    def resume_key(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in RESUME_FREE_KEYS}


def _order(n: int, seed: int, epoch: int) -> torch.Tensor:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))


def batch_indices(cursor: int, size: int, n: int, seed: int) -> torch.Tensor:
    """Items ``[cursor, cursor + size)`` of the endless sequence of per-epoch permutations of ``range(n)``."""
    out: list[int] = []
    pos = cursor
    while len(out) < size:
        epoch, off = divmod(pos, n)
        take = min(size - len(out), n - off)
        out.extend(_order(n, seed, epoch)[off:off + take].tolist())
        pos += take
    return torch.tensor(out, dtype=torch.long)


class _Logger:
    def __init__(self, out_dir: Path, tensorboard: bool, main: bool) -> None:
        self.main = main
        self.path = out_dir / "train_log.jsonl"
        self.writer = None
        if main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                print("note: TensorBoard is not installed (pip install tensorboard); logging to train_log.jsonl only")

    def log(self, step: int, values: dict) -> None:
        if not self.main:
            return
        with self.path.open("a") as f:
            f.write(json.dumps({"step": step, **values}) + "\n")
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def adamw(params, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel where it has one for these parameters: on Stage C lite's adapter it steps 3-6x
    faster on a CPU than torch's other AdamW implementations and, unlike the for-each one (torch's CUDA default), holds
    no adapter-sized temporary (benchmarks/optimizer_step.py). Same update rule and state, so checkpoints resume either
    way; torch builds without the kernel get the default."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):  # no fused kernel for this device or torch version
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


class Trainer:
    """One training run. ``run()`` resumes from the newest checkpoint in ``out_dir`` when there is one."""

    def __init__(self, cfg: TrainConfig, unet, data: DPOData, user_tokens: torch.Tensor, embedder_id: str,
                 accelerator=None, show_progress: bool = True) -> None:
        from accelerate import Accelerator

        cfg.validate()
        self.cfg = cfg
        self.acc = accelerator or Accelerator(mixed_precision=cfg.mixed_precision)
        self.device = self.acc.device
        self.show_progress = show_progress
        if user_tokens.shape[0] != len(data.user_ids):
            raise PPDError(f"{user_tokens.shape[0]} user embeddings for {len(data.user_ids)} users in the data.")
        self.data = data
        self.data_hash = data.digest()  # hashes every latent: once per run, not per checkpoint
        # [U, T, D], or [U, V, T, D]: V embeddings ("views") per user from disjoint pair sets; one is drawn per pair
        self.user_tokens = (user_tokens if user_tokens.dim() == 4 else user_tokens[:, None]).float()
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        info = stage_c_info(unet)
        self.adapter_config = AdapterConfig.for_stage_c(info, embed_dim=user_tokens.shape[-1],
                                                        num_tokens=user_tokens.shape[-2], proj_dim=cfg.proj_dim,
                                                        embedder=embedder_id)
        adapter = PPDAdapter(self.adapter_config)
        self.unet = unet.to(self.device).eval().requires_grad_(False)  # eval: no dropout, policy == ref at init
        if cfg.gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        self.binding = PPDBinding(self.unet, adapter)
        adapter = adapter.to(self.device)
        self.adapter, self.optimizer = self.acc.prepare(adapter, adamw(adapter.parameters(), cfg.lr, cfg.weight_decay))
        warm = max(1, cfg.warmup_steps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: min(1.0, (s + 1) / warm))
        n_val = int(len(data) * cfg.val_fraction)
        perm = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed + 7))
        self.val = data.subset(perm[:n_val]) if n_val else None
        self.train = data.subset(perm[n_val:])
        self.clip_img = torch.zeros(1, 1, clip_image_dim(unet))
        self.step, self.cursor, self.nan_run = 0, 0, 0

    # --------------------------------------------------------------------------------------------------- one step
    def _inputs(self, data: DPOData, idx: torch.Tensor, g: torch.Generator, dropout: float):
        b = len(idx)
        xw, xl = data.latents_w[idx], data.latents_l[idx]
        t = self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * torch.rand(b, generator=g)
        eps = torch.randn(xw.shape, generator=g)
        keep = (torch.rand(b, generator=g) >= dropout).float()
        view = torch.randint(self.user_tokens.shape[1], (b,), generator=g)
        users = self.user_tokens[data.user_idx[idx], view] * keep[:, None, None]
        cap = data.caption_idx[idx]
        dev = self.device
        both = dict(sample=torch.cat([add_noise(xw, eps, t), add_noise(xl, eps, t)]).to(dev),
                    timestep_ratio=torch.cat([t, t]).to(dev),
                    clip_text_pooled=data.pooled[cap].repeat(2, 1, 1).to(dev),
                    clip_text=data.text[cap].repeat(2, 1, 1).to(dev),
                    clip_img=self.clip_img.expand(2 * b, -1, -1).to(dev))
        return both, torch.cat([users, users]).to(dev), eps.to(dev)

    def _loss(self, inputs: dict, users: torch.Tensor, eps: torch.Tensor, backward_scale: float | None):
        b = eps.shape[0]
        with self.acc.autocast():
            with torch.no_grad(), self.binding.adapter_off():  # the reference: same network, adapter off
                ref = self.unet(**inputs).sample
            kv = self.adapter(users)
            with self.binding.user(kv):
                pred = self.unet(**inputs).sample
                stats = dpo_loss(pred[:b], pred[b:], ref[:b], ref[b:], eps, self.cfg.beta)
                if backward_scale is not None and torch.isfinite(stats.loss):
                    self.acc.backward(stats.loss * backward_scale)  # inside: checkpointed blocks recompute here
        return stats

    def _generator(self, step: int, micro: int) -> torch.Generator:
        rank = self.acc.process_index
        return torch.Generator().manual_seed(((self.cfg.seed * 1_000_003 + step) * 131 + micro) * 257 + rank)

    def train_step(self) -> dict:
        cfg, world, rank = self.cfg, self.acc.num_processes, self.acc.process_index
        totals = {"loss": 0.0, "implicit_acc": 0.0, "model_mse": 0.0, "ref_mse": 0.0}
        finite = True
        for micro in range(cfg.grad_accum):
            idx = batch_indices(self.cursor + rank * cfg.batch_size, cfg.batch_size, len(self.train), cfg.seed)
            self.cursor += cfg.batch_size * world
            inputs, users, eps = self._inputs(self.train, idx, self._generator(self.step, micro), cfg.user_dropout)
            stats = self._loss(inputs, users, eps, 1.0 / cfg.grad_accum)
            finite &= bool(torch.isfinite(stats.loss))
            for k in totals:
                value = getattr(stats, k)
                totals[k] += float(value.detach() if torch.is_tensor(value) else value) / cfg.grad_accum
        grads_ok = finite and all(p.grad is None or torch.isfinite(p.grad).all() for p in self.adapter.parameters())
        if grads_ok:
            if cfg.max_grad_norm > 0:
                self.acc.clip_grad_norm_(self.adapter.parameters(), cfg.max_grad_norm)
            self.optimizer.step()
            check_finite_parameters(self.adapter.named_parameters(), self.step + 1)
            self.nan_run = 0
        else:
            self.nan_run += 1
            print(f"warning: step {self.step + 1}: non-finite loss or gradients, step skipped "
                  f"({self.nan_run} in a row)")
            if self.nan_run >= cfg.max_nan_steps:
                raise PPDError(f"The loss was NaN/inf for {self.nan_run} steps in a row; stopping. Lower lr or beta, "
                               "check the data for extreme values, or use mixed_precision=bf16 instead of fp16. "
                               "The last checkpoint is intact.")
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        self.step += 1
        totals["lr"] = float(self.scheduler.get_last_lr()[0])
        totals["skipped"] = float(not grads_ok)
        return totals

    @torch.no_grad()
    def validate(self) -> dict:
        assert self.val is not None
        n, out = len(self.val), {"val_loss": 0.0, "val_implicit_acc": 0.0}
        for start in range(0, n, self.cfg.batch_size):
            idx = torch.arange(start, min(n, start + self.cfg.batch_size))
            g = torch.Generator().manual_seed(self.cfg.seed + 12345 + start)
            inputs, users, eps = self._inputs(self.val, idx, g, 0.0)
            stats = self._loss(inputs, users, eps, backward_scale=None)
            out["val_loss"] += float(stats.loss) * len(idx) / n
            out["val_implicit_acc"] += stats.implicit_acc * len(idx) / n
        return out

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _state_meta(self) -> dict:
        return {"step": self.step, "cursor": self.cursor, "nan_run": self.nan_run, "config": self.cfg.resume_key(),
                "data": self.data_hash, "scheduler": {"last_epoch": self.scheduler.last_epoch}}

    def save_checkpoint(self) -> Path:
        path = self.out_dir / "checkpoints" / f"step-{self.step:08d}.safetensors"
        if self.acc.is_main_process:
            save_checkpoint(path, self.acc.unwrap_model(self.adapter), self.optimizer, self._state_meta())
            prune_checkpoints(path.parent, self.cfg.keep_checkpoints)
        self.acc.wait_for_everyone()
        return path

    def resume(self, force: bool = False) -> bool:
        found = load_latest(self.out_dir / "checkpoints", self.acc.unwrap_model(self.adapter), self.optimizer)
        if found is None:
            return False
        path, meta = found
        if meta["data"] != self.data_hash and not force:
            raise PPDError(f"{path} was trained on other data ({meta['data']} vs {self.data_hash}). Resume with "
                           "the same data, use another out_dir, or pass --force.")
        old, new = meta["config"], self.cfg.resume_key()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed and not force:
            raise PPDError(f"{path} was made with another config (changed: {', '.join(changed)}). Resuming would not "
                           "continue the same run; restore those values, use another out_dir, or pass --force.")
        self.step, self.cursor, self.nan_run = meta["step"], meta["cursor"], meta["nan_run"]
        self.scheduler.last_epoch = meta["scheduler"]["last_epoch"]
        self.scheduler._last_lr = [  # type: ignore[attr-defined]
            group["lr"] for group in self.optimizer.param_groups]
        return True

    # -------------------------------------------------------------------------------------------------------- run
    def run(self, resume: bool = True, force: bool = False, on_step=None) -> Path:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if resume and self.resume(force):
            print(f"resumed from step {self.step}")
        logger = _Logger(self.out_dir, cfg.tensorboard, self.acc.is_main_process)
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc="PPD fit", unit="step",
                   disable=not self.show_progress or not self.acc.is_main_process)
        pairs_per_step = cfg.batch_size * cfg.grad_accum * self.acc.num_processes
        last: dict = {}
        t0, s0 = time.perf_counter(), self.step
        try:
            while self.step < cfg.max_steps:
                values = self.train_step()
                last = values
                if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    values["pairs_per_s"] = (self.step - s0) * pairs_per_step / elapsed
                    logger.log(self.step, values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['implicit_acc']:.2f}")
                if self.val is not None and cfg.val_every and self.step % cfg.val_every == 0:
                    logger.log(self.step, self.validate())
                if self.step % cfg.checkpoint_every == 0 or self.step == cfg.max_steps:
                    self.save_checkpoint()
                bar.update(1)
                if on_step is not None:
                    on_step(self.step)
        finally:
            bar.close()
            logger.close()
        summary = {"base_model": cfg.stage_c, "embedder": self.adapter_config.embedder, "beta": cfg.beta,
                   "steps": self.step, "data_hash": self.data_hash, "pairs": len(self.train),
                   "users": len(self.data.user_ids), "lr": cfg.lr, "batch_pairs": pairs_per_step,
                   "user_dropout": cfg.user_dropout, "final_loss": last.get("loss", math.nan)}
        if self.val is not None:
            summary.update(self.validate())
        out = self.out_dir / "adapter.safetensors"
        if self.acc.is_main_process:
            save_adapter(self.acc.unwrap_model(self.adapter), out, training=summary)
        self.acc.wait_for_everyone()
        return out

    def detach(self) -> None:
        self.binding.detach()
