"""``ppd-train fit``: train the PPD adapter on many users at once with the user-conditioned Diffusion-DPO loss.

Exact resume needs no random-state bookkeeping: the data order is a function of (seed, epoch) and all per-step noise
comes from a generator seeded by (seed, step, micro-batch, process). A checkpoint therefore only holds the adapter,
the optimizer, the scheduler and the data cursor — as safetensors, written atomically.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .adapter import BASES, AdapterConfig, PPDAdapter, read_adapter_config, save_adapter
from .binding import PPDBinding, model_info, set_gradient_checkpointing
from .checkpoint import load_latest, prune_checkpoints, save_checkpoint
from .dpo_data import DPOData, tensor_digest
from .errors import PPDError
from .guards import check_finite_parameters
from .optim import OPTIMIZERS, make_optimizer
from .pair_step import pair_inputs, pair_loss
from .safetensors_io import dumps_json

# Keys that may change between a run and its resume without changing the result.
RESUME_FREE_KEYS = {"out_dir", "max_steps", "max_epochs", "patience", "checkpoint_every", "keep_checkpoints",
                    "log_every", "tensorboard"}
# What validation can select on: pairs of held-out users (never trained on) or held-out pairs of trained users.
SELECT_METRICS = ("val_users_implicit_acc", "val_users_loss", "val_pairs_implicit_acc", "val_pairs_loss", "last")
# The default budget when neither max_steps nor max_epochs is set (see budget()).
AUTO_EPOCHS, AUTO_MIN_STEPS, AUTO_MAX_STEPS = 20, 300, 20_000


@dataclass
class TrainConfig:
    config_version: int = 1
    seed: int = 0
    stage_c: str = ""  # diffusers folder or Stability single-file .safetensors
    stage_c_config: str = ""  # diffusers config.json, only for single files of non-standard size
    sdxl: str = ""  # or: SDXL, a diffusers folder or a single-file .safetensors checkpoint (set one of the two)
    sdxl_config: str = ""  # single files not shaped like SDXL 1.0: their diffusers folder or UNet config.json
    data: str = ""  # DPO data file (see dpo_data.py)
    embeddings: str = ""  # embedding table from `ppd-train embed`
    out_dir: str = "runs/ppd"
    proj_dim: int = 0  # width of the shared user projector (0 = Stage C width)
    max_steps: int = 0  # optimizer steps; 0 = from max_epochs
    max_epochs: float = 0.0  # passes over the training pairs; 0 (with max_steps 0) = the automatic budget
    batch_size: int = 16  # pairs per micro-batch per process
    grad_accum: int = 1
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    lr_schedule: str = "constant"  # constant | cosine (decays to 0 at the end of the budget)
    max_grad_norm: float = 1.0
    optimizer: str = "adamw"  # adamw | adamw8bit (8-bit moments: 3/4 less optimizer state; ppd_train/optim.py)
    beta: float = 2500.0  # diffusers convention: -log sigmoid(-beta * diff); Salesforce's beta 5000 with 0.5
    user_dropout: float = 0.0  # share of pairs trained with the adapter off (exactly inference's "no user")
    token_noise: float = 0.0  # Gaussian noise on user tokens while training, in units of each token's own std
    t_min: float = 0.0
    t_max: float = 1.0
    mixed_precision: str = "no"  # no | bf16 | fp16
    # The frozen base model's weights (Stage C or SDXL): auto = bf16 under mixed_precision=bf16 (as diffusers' training
    # scripts keep a frozen network: autocast rounds its weights to bf16 for every matmul anyway; half the memory), else
    # float32.
    stage_c_dtype: str = "auto"  # auto | float32 | bf16
    gradient_checkpointing: bool = False
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    val_fraction: float = 0.05  # share of the trained users' pairs held out for validation
    heldout_users: float = 0.1  # share of users held out entirely (pairs and embeddings never trained on)
    val_every: int = 0  # steps between validations; 0 = once per epoch (at least every 25, at most every 500 steps)
    select_metric: str = "val_users_implicit_acc"  # the saved adapter is the best by this; "last" = no selection
    patience: int = 0  # stop after this many validations without improvement of select_metric; 0 = never
    val_draws: int = 4  # noise/timestep draws per validation pair (its implicit accuracy: sign of the mean margin)
    # share of the budget after which validations start to count for selection and patience: on small data the held-out
    # metric is noisy, and an early lucky validation must not end a run after one epoch (docs/world-sweep.md)
    select_after: float = 0.25
    log_every: int = 10
    tensorboard: bool = True
    max_nan_steps: int = 5  # consecutive non-finite losses before the run stops

    def validate(self) -> None:
        fin = math.isfinite
        checks = [(self.max_steps >= 0, "max_steps must be >= 0 (0: from max_epochs)"),
                  (fin(self.max_epochs) and self.max_epochs >= 0, "max_epochs must be >= 0"),
                  (self.batch_size > 0, "batch_size must be > 0"),
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
                  (self.max_nan_steps >= 1, "max_nan_steps must be >= 1"),
                  (0 <= self.user_dropout < 1, "user_dropout must be in [0, 1)"),
                  (0 <= self.t_min < self.t_max <= 1, "need 0 <= t_min < t_max <= 1"),
                  (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
                  (0 <= self.heldout_users < 1, "heldout_users must be in [0, 1)"),
                  (self.val_every >= 0, "val_every must be >= 0 (0: once per epoch)"),
                  (self.patience >= 0, "patience must be >= 0 (0: no early stopping)"),
                  (self.val_draws >= 1, "val_draws must be >= 1"),
                  (0 <= self.select_after < 1, "select_after must be in [0, 1)"),
                  (math.isfinite(self.token_noise) and self.token_noise >= 0, "token_noise must be >= 0"),
                  (self.select_metric in SELECT_METRICS, f"select_metric must be one of {', '.join(SELECT_METRICS)}"),
                  (self.mixed_precision in ("no", "bf16", "fp16"), "mixed_precision must be no, bf16 or fp16"),
                  (self.lr_schedule in ("constant", "cosine"), "lr_schedule must be constant or cosine"),
                  (self.stage_c_dtype in ("auto", "float32", "bf16"), "stage_c_dtype must be auto, float32 or bf16"),
                  (self.stage_c_dtype != "bf16" or self.mixed_precision == "bf16",
                   "stage_c_dtype = bf16 needs mixed_precision = bf16 (bf16 weights compute under bf16 autocast)"),
                  (self.optimizer in OPTIMIZERS,
                   f"optimizer must be {' or '.join(OPTIMIZERS)} (adamw8bit keeps 8-bit moments: less memory)"),
                  (self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1"),
                  (not (self.stage_c and self.sdxl), "set one base model, stage_c or sdxl, not both")]
        for ok, msg in checks:
            if not ok:
                raise PPDError(f"Config: {msg}. Fix it in the config file or with --set KEY=VALUE.")

    def frozen_dtype(self) -> torch.dtype:
        """The dtype the frozen base model is held in (``stage_c_dtype`` resolved; the name is older than SDXL)."""
        bf16 = self.stage_c_dtype == "bf16" or (self.stage_c_dtype == "auto" and self.mixed_precision == "bf16")
        return torch.bfloat16 if bf16 else torch.float32

    def resume_key(self) -> dict:
        key = {k: v for k, v in asdict(self).items() if k not in RESUME_FREE_KEYS}
        key["stage_c_dtype"] = str(self.frozen_dtype()).removeprefix("torch.")  # what ran, not how it was asked
        return key


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
            f.write(dumps_json({"step": step, **values}, sort_keys=False) + "\n")  # a skipped step's NaN: null
        if self.writer is not None:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def heldout_user_indices(n_users: int, share: float, seed: int) -> list[int]:
    """Users held out of training entirely, for model selection: ``round(share * n_users)``, at least one when
    ``share`` > 0 and there are 3 users or more, never all; a function of the seed only."""
    n = round(share * n_users)
    if share > 0 and n_users >= 3:
        n = max(1, n)
    n = min(n, n_users - 1)
    if n <= 0:
        return []
    return sorted(torch.randperm(n_users, generator=torch.Generator().manual_seed(seed + 11))[:n].tolist())


def budget(cfg: TrainConfig, n_train: int, pairs_per_step: int) -> int:
    """Optimizer steps of a run. ``max_steps`` and ``max_epochs`` both cap it (whichever ends first); with neither
    set, the automatic budget is AUTO_EPOCHS epochs, kept within [AUTO_MIN_STEPS, AUTO_MAX_STEPS] steps: small data
    gets more passes, large data fewer, and early stopping on held-out users (``patience``) ends it sooner."""
    per_epoch = n_train / pairs_per_step
    caps = []
    if cfg.max_steps:
        caps.append(cfg.max_steps)
    if cfg.max_epochs:
        caps.append(math.ceil(cfg.max_epochs * per_epoch))
    if not caps:
        caps.append(min(AUTO_MAX_STEPS, max(AUTO_MIN_STEPS, math.ceil(AUTO_EPOCHS * per_epoch))))
    return max(1, min(caps))


class Trainer:
    """One training run. ``run()`` resumes from the newest checkpoint in ``out_dir`` when there is one.

    The data is split three ways: pairs of held-out users (``heldout_users``: neither their pairs nor their embeddings
    are ever trained on), held-out pairs of the trained users (``val_fraction``), and the training pairs. Validation
    reports the DPO loss and implicit accuracy of both held-out sets; the saved adapter is the best by
    ``select_metric`` (``adapter.safetensors``), the last one is kept beside it (``adapter_last.safetensors``).
    """

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
        self.users_hash = tensor_digest(self.user_tokens)  # resuming with re-made embeddings is another run
        self.out_dir = Path(cfg.out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        info = model_info(unet)
        data.check_fits(unet.config, "the training data", f"the {BASES[info.base]} model")  # e.g. SDXL data on Stage C
        self.adapter_config = AdapterConfig.for_model(info, embed_dim=user_tokens.shape[-1],
                                                        num_tokens=user_tokens.shape[-2], proj_dim=cfg.proj_dim,
                                                        embedder=embedder_id)
        adapter = PPDAdapter(self.adapter_config)
        self.unet = unet.to(self.device).eval().requires_grad_(False)  # eval: no dropout, policy == ref at init
        if self.unet.dtype != cfg.frozen_dtype():  # `fit` loads it in that dtype already (no float32 copy first)
            self.unet.to(cfg.frozen_dtype())
        if cfg.gradient_checkpointing:
            set_gradient_checkpointing(self.unet, True)
        self.binding = PPDBinding(self.unet, adapter)
        adapter = adapter.to(self.device)
        self.adapter, self.optimizer = self.acc.prepare(
            adapter, make_optimizer(cfg.optimizer, adapter.parameters(), cfg.lr, cfg.weight_decay))
        self._split(data)
        self.pairs_per_step = cfg.batch_size * cfg.grad_accum * self.acc.num_processes
        self.max_steps = budget(cfg, len(self.train), self.pairs_per_step)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.lr_factor)
        per_epoch = len(self.train) / self.pairs_per_step
        self.val_every = cfg.val_every or min(500, max(25, round(per_epoch)))
        self.select_metric = self._selectable(cfg.select_metric)
        self.pair_inputs = pair_inputs(unet)  # the base's noise schedule and conditioning
        self.step, self.cursor, self.nan_run = 0, 0, 0
        self.best: dict | None = None  # {"step", "value"} of the best validation so far
        self.bad_rounds = 0  # validations since the best one
        self.last: dict = {}  # the last logged training and validation values

    def lr_factor(self, step: int) -> float:
        """Linear warmup over ``warmup_steps``, then constant or (``lr_schedule = "cosine"``) a cosine decay to 0 at
        the end of the budget."""
        cfg = self.cfg
        warm = min(1.0, (step + 1) / max(1, cfg.warmup_steps))
        if cfg.lr_schedule == "constant":
            return warm
        span = max(1, self.max_steps - cfg.warmup_steps)
        done = min(1.0, max(0, step - cfg.warmup_steps) / span)
        return warm * 0.5 * (1 + math.cos(math.pi * done))

    def _split(self, data: DPOData) -> None:
        held = heldout_user_indices(len(data.user_ids), self.cfg.heldout_users, self.cfg.seed)
        self.heldout_ids = [data.user_ids[i] for i in held]
        is_held = torch.zeros(len(data.user_ids), dtype=torch.bool)
        is_held[held] = True
        pair_held = is_held[data.user_idx]
        self.val_users = data.subset(torch.nonzero(pair_held).flatten()) if pair_held.any() else None
        rest = torch.nonzero(~pair_held).flatten()
        rest = rest[torch.randperm(len(rest), generator=torch.Generator().manual_seed(self.cfg.seed + 7))]
        n_val = int(len(rest) * self.cfg.val_fraction)
        if len(rest) - n_val <= 0:
            raise PPDError("No training pairs are left after holding out users and pairs; lower heldout_users or "
                           "val_fraction, or add pairs.")
        self.val_pairs = data.subset(rest[:n_val]) if n_val else None
        self.train = data.subset(rest[n_val:])

    def _selectable(self, metric: str) -> str:
        """The metric the run selects on; says so when the configured one has no data (never a silent change)."""
        if metric.startswith("val_users") and self.val_users is None:
            fallback = metric.replace("val_users", "val_pairs") if self.val_pairs is not None else "last"
            print(f"note: select_metric {metric} needs held-out users (heldout_users > 0 and >= 3 users); "
                  f"selecting on {fallback} instead")
            return fallback
        if metric.startswith("val_pairs") and self.val_pairs is None:
            print(f"note: select_metric {metric} needs held-out pairs (val_fraction > 0); keeping the last adapter")
            return "last"
        return metric

    # --------------------------------------------------------------------------------------------------- one step
    def _inputs(self, data: DPOData, idx: torch.Tensor, g: torch.Generator, dropout: float, noise: float = 0.0):
        """Noised pair latents (preferred rows first, then dispreferred), each pair's own user tokens, the per-row
        adapter weight (0 = dropped: the adapter is off for that pair, exactly inference's "no user") and the noise."""
        b = len(idx)
        t = self.cfg.t_min + (self.cfg.t_max - self.cfg.t_min) * torch.rand(b, generator=g)
        eps = torch.randn((b, *data.latents_w.shape[1:]), generator=g)
        keep = (torch.rand(b, generator=g) >= dropout).float()
        view = torch.randint(self.user_tokens.shape[1], (b,), generator=g)
        users = self.user_tokens[data.user_idx[idx], view]
        if noise:
            users = users + noise * users.std(dim=-1, keepdim=True) * torch.randn(users.shape, generator=g)
        both = self.pair_inputs(data, idx, t, eps, self.device)
        return both, torch.cat([users, users]).to(self.device), torch.cat([keep, keep]), eps.to(self.device)

    def _loss(self, inputs: dict, users: torch.Tensor, weights: torch.Tensor, eps: torch.Tensor,
              backward_scale: float | None):
        # A dropped pair (weight 0) runs with the adapter off, as "no user" does at inference; Stage C is frozen, so its
        # policy equals the reference and its DPO term is ln 2 with no gradient.
        backward = None if backward_scale is None else (lambda loss: self.acc.backward(loss * backward_scale))
        return pair_loss(self.binding, inputs, eps, lambda: self.adapter(users), self.cfg.beta,
                         weights if bool((weights == 0).any()) else 1.0, self.acc.autocast, backward)

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
            inputs, users, weights, eps = self._inputs(self.train, idx, self._generator(self.step, micro),
                                                       cfg.user_dropout, cfg.token_noise)
            stats = self._loss(inputs, users, weights, eps, 1.0 / cfg.grad_accum)
            finite &= bool(torch.isfinite(stats.loss))
            for k in totals:
                value = getattr(stats, k)
                totals[k] += float(value.detach() if torch.is_tensor(value) else value) / cfg.grad_accum
        if world > 1:  # every process skips or steps together, or their adapters drift apart
            finite = bool(self.acc.gather(torch.tensor([finite], device=self.acc.device)).all())
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

    # ------------------------------------------------------------------------------------------------- validation
    @torch.no_grad()
    def _evaluate(self, data: DPOData, name: str) -> dict:
        """DPO loss and implicit accuracy over a held-out set, with fixed noise and timesteps (no dropout). Each pair is
        scored ``val_draws`` times (other noise and timestep each); its implicit accuracy is the sign of its mean
        margin, so one draw's noise does not decide it."""
        n, draws, loss = len(data), self.cfg.val_draws, 0.0
        margins = torch.zeros(n)
        for d in range(draws):
            for start in range(0, n, self.cfg.batch_size):
                idx = torch.arange(start, min(n, start + self.cfg.batch_size))
                g = torch.Generator().manual_seed(self.cfg.seed + 12345 + start + 7919 * d)
                inputs, users, weights, eps = self._inputs(data, idx, g, 0.0)
                stats = self._loss(inputs, users, weights, eps, backward_scale=None)
                loss += float(stats.loss) * len(idx) / (n * draws)
                margins[idx] += stats.margins.float().cpu()
        return {f"{name}_loss": loss, f"{name}_implicit_acc": (margins > 0).float().mean().item()}

    def validate(self) -> dict:
        out: dict = {}
        if self.val_pairs is not None:
            out.update(self._evaluate(self.val_pairs, "val_pairs"))
        if self.val_users is not None:
            out.update(self._evaluate(self.val_users, "val_users"))
        return out

    def _improved(self, value: float) -> bool:
        if self.best is None:
            return True
        lower = self.select_metric.endswith("_loss")
        return value < self.best["value"] if lower else value > self.best["value"]

    def _select(self, values: dict) -> None:
        """Keep the best adapter so far (by select_metric) and count validations without improvement."""
        if self.select_metric == "last" or self.select_metric not in values:
            return
        if self.step < self.cfg.select_after * self.max_steps:
            return
        value = values[self.select_metric]
        if self._improved(value):
            self.best, self.bad_rounds = {"step": self.step, "value": value}, 0
            if self.acc.is_main_process:
                save_adapter(self.acc.unwrap_model(self.adapter), self._best_path)
        else:
            self.bad_rounds += 1

    @property
    def _best_path(self) -> Path:
        return self.out_dir / "checkpoints" / "best.safetensors"

    @property
    def stopped_early(self) -> bool:
        return self.cfg.patience > 0 and self.bad_rounds >= self.cfg.patience

    # ------------------------------------------------------------------------------------------------ checkpoints
    def _state_meta(self) -> dict:
        return {"step": self.step, "cursor": self.cursor, "nan_run": self.nan_run, "config": self.cfg.resume_key(),
                "data": self.data_hash, "users": self.users_hash,
                "scheduler": {"last_epoch": self.scheduler.last_epoch},
                "best": self.best, "bad_rounds": self.bad_rounds, "last": self.last}

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
        if meta.get("users", self.users_hash) != self.users_hash and not force:
            raise PPDError(f"{path} was trained with other user embeddings (the embedding table was re-made or "
                           "changed). Resume with the same table, use another out_dir, or pass --force.")
        # checkpoints from before a key ran with its old behaviour: AdamW, a float32 Stage C, no SDXL
        old = {"optimizer": "adamw", "stage_c_dtype": "float32", "sdxl": "", "sdxl_config": "", **meta["config"]}
        new = self.cfg.resume_key()
        changed = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
        if changed and not force:
            raise PPDError(f"{path} was made with another config (changed: {', '.join(changed)}). Resuming would not "
                           "continue the same run; restore those values, use another out_dir, or pass --force.")
        self.step, self.cursor, self.nan_run = meta["step"], meta["cursor"], meta["nan_run"]
        self.best, self.bad_rounds, self.last = meta.get("best"), meta.get("bad_rounds", 0), meta.get("last", {})
        if self.best is not None and not self._best_path.is_file():
            raise PPDError(f"{path} records a best adapter at step {self.best['step']}, but {self._best_path} is "
                           "missing. Restore it, or start again in another out_dir.")
        self.scheduler.last_epoch = meta["scheduler"]["last_epoch"]
        self.scheduler._last_lr = [  # type: ignore[attr-defined]
            group["lr"] for group in self.optimizer.param_groups]
        return True

    # -------------------------------------------------------------------------------------------------------- run
    def run(self, resume: bool = True, force: bool = False, on_step=None) -> Path:
        from tqdm.auto import tqdm

        cfg = self.cfg
        if resume and self.resume(force):
            if self.step > self.max_steps:  # its weights are past this budget: no file may claim fewer steps
                raise PPDError(f"The checkpoint in {self.out_dir / 'checkpoints'} is at step {self.step} > max_steps "
                               f"{self.max_steps}: its weights have {self.step} steps of training, and an adapter "
                               f"written now would hold them under a summary of {self.max_steps}. Set max_steps "
                               f">= {self.step} to finish this run from there, or use another out_dir (or "
                               f"--no-resume) to train {self.max_steps} steps from the start.")
            done = self.out_dir / "adapter.safetensors"
            # a rerun of a finished run: rewriting the adapter would only replace its summary with one of 0 steps
            if (self.step >= self.max_steps or self.stopped_early) and done.is_file():
                raise_what = "patience (it stopped early)" if self.stopped_early else "max_steps"
                print(f"already trained to step {self.step} in {self.out_dir}: nothing to do. Raise {raise_what} to "
                      "train on, or use another out_dir (or --no-resume) to train again.")
                return done
            print(f"resumed from step {self.step}")
        logger = _Logger(self.out_dir, cfg.tensorboard, self.acc.is_main_process)
        bar = tqdm(total=self.max_steps, initial=self.step, desc="PPD fit", unit="step",
                   disable=not self.show_progress or not self.acc.is_main_process)
        t0, s0 = time.perf_counter(), self.step
        try:
            while self.step < self.max_steps and not self.stopped_early:
                values = self.train_step()
                end = self.step == self.max_steps
                if self.step % cfg.log_every == 0 or end:
                    elapsed = max(time.perf_counter() - t0, 1e-9)
                    values["pairs_per_s"] = (self.step - s0) * self.pairs_per_step / elapsed
                    values["epoch"] = self.step * self.pairs_per_step / len(self.train)
                    self.last = {**self.last, **values}
                    logger.log(self.step, values)
                    bar.set_postfix(loss=f"{values['loss']:.4f}", acc=f"{values['implicit_acc']:.2f}")
                if self.step % self.val_every == 0 or end:
                    val = self.validate()
                    self._select(val)
                    self.last.update(val)
                    if val:
                        logger.log(self.step, val)
                if self.step % cfg.checkpoint_every == 0 or end or self.stopped_early:
                    self.save_checkpoint()
                bar.update(1)
                if on_step is not None:
                    on_step(self.step)
        finally:
            bar.close()
            logger.close()
        if self.stopped_early:
            print(f"early stop at step {self.step}: {self.select_metric} has not improved for {self.bad_rounds} "
                  f"validations (best {self.best['value']:.4f} at step {self.best['step']})"  # type: ignore[index]
                  if self.best else f"early stop at step {self.step}")
        return self._write_adapters()

    def _write_adapters(self) -> Path:
        """``adapter.safetensors`` (the selected one: the best by select_metric, else the last) and
        ``adapter_last.safetensors``, both with the run's summary."""
        cfg = self.cfg
        selected = {"metric": "last", "step": self.step, "value": None}
        if self.best is not None:
            selected = {"metric": self.select_metric, **self.best}
        summary = {"base_model": cfg.stage_c or cfg.sdxl, "embedder": self.adapter_config.embedder, "beta": cfg.beta,
                   "steps": self.step, "max_steps": self.max_steps, "stopped_early": self.stopped_early,
                   "data_hash": self.data_hash, "pairs": len(self.train), "users": len(self.data.user_ids),
                   "heldout_users": self.heldout_ids, "lr": cfg.lr, "batch_pairs": self.pairs_per_step,
                   "user_dropout": cfg.user_dropout, "token_noise": cfg.token_noise,
                   "t_min": cfg.t_min, "t_max": cfg.t_max, "final_loss": self.last.get("loss"), "selected": selected,
                   "last": self.last}
        out = self.out_dir / "adapter.safetensors"
        if self.acc.is_main_process:
            model = self.acc.unwrap_model(self.adapter)
            save_adapter(model, self.out_dir / "adapter_last.safetensors", training=summary)
            if self.best is not None:
                best = PPDAdapter(self.adapter_config)
                best.load_state_dict(read_adapter_config(self._best_path)[1])
                save_adapter(best, out, training=summary)
            else:
                save_adapter(model, out, training=summary)
        self.acc.wait_for_everyone()
        return out

    def detach(self) -> None:
        self.binding.detach()
