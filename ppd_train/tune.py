"""``ppd-train tune-user``: fit one user's embedding to all of their pairs, adapter and Stage C frozen.

The paper fixes a user's embedding from N = 4 pairs read by the embedder. An artist with 20 or 200 pairs can do more:
optimise the embedding itself with the same user-conditioned Diffusion-DPO loss the adapter was trained with
(``pair_step.py``; reference = the adapter off). The embedding is

    tokens = center + sum_i c_i (e_i - center) + rms(center) * delta

with ``center`` the start (the embedder's embedding of the user, else the mean of the library), ``e_i`` a library of
known users' embeddings (e.g. the training users of the adapter), ``c`` the mixing weights (few parameters, for few
pairs) and ``delta`` a free change of every token (in units of the start's token RMS, so ``lr`` does not depend on the
embedder's scale). ``mode`` picks what learns: ``mix`` (c), ``tokens`` (delta), ``mix+tokens`` (c first, then delta
from the best mix); ``auto`` is ``tokens`` from a start embedding and ``mix+tokens`` from a library alone (a cold
start). A share of the pairs is held
out: the start and every ``val_every`` steps are scored on them (DPO loss, ``val_draws`` noise draws each) and the best
is kept, so tuning never returns something that scores worse on held-out pairs than its start (the start is kept
unless a tuned embedding is strictly better: ``report["start_kept"]``); ``patience`` stops it (:class:`Selection`).
An L2 pull toward the start (``anchor``) keeps the tuned tokens near it, so the samples stay on the data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch

from .binding import PPDBinding, half_autocast, set_gradient_checkpointing
from .dpo_data import DPOData, tensor_digest
from .embedding import UserEmbedding, check_compatible
from .errors import IncompatibleError, PPDError
from .pair_step import pair_inputs, pair_loss

MODES = ("auto", "tokens", "mix", "mix+tokens")


@dataclass
class TuneConfig:
    mode: str = "auto"  # auto | tokens | mix | mix+tokens (see the module docstring)
    max_steps: int = 200  # per phase
    lr: float = 0.05  # Adam; delta is in units of the start's token RMS, c in units of one library user's offset
    # penalty anchor * mean(((tokens - center) / rms(center))^2): pulls towards the start, to stay on the data. 0.3
    # kept 83% of the reward gain at N = 16 and cut the largest drift 1.81 -> 1.60 sd (bound 2); at N = 4, 3 seeds,
    # unanchored tuning drifted up to 1.94 sd (benchmarks/tune_anchor.py, small-k4 world)
    anchor: float = 0.3
    beta: float = 0.0  # DPO beta; 0 = beta_scale x the adapter's own training beta
    # A weaker KL anchor than the adapter's: one user's tokens are few parameters, and at the adapter's own beta tuning
    # gave up reward for staying close to the base model (docs/tune-user.md)
    beta_scale: float = 0.3
    t_min: float = -1.0  # timesteps drawn in [t_min, t_max]; < 0 = the adapter's training range
    t_max: float = -1.0
    batch_size: int = 16  # pairs per step (all training pairs when there are fewer)
    val_fraction: float = 0.25  # share of the pairs held out for selection and early stopping (at least 1)
    val_every: int = 10
    val_draws: int = 8  # noise/timestep draws per held-out pair
    patience: int = 5  # validations without improvement before a phase stops; 0 = never
    seed: int = 0
    # Stage C's blocks recompute their activations in backward instead of keeping them (as `fit`'s option): needed at
    # real widths (Stage C lite, 2 pairs, fp32: 11+ GiB without it); same tokens, ~30% more compute
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        fin = math.isfinite
        checks = [(self.mode in MODES, f"mode must be one of {', '.join(MODES)}"),
                  (self.max_steps >= 0, "max_steps must be >= 0"),
                  (fin(self.lr) and 0 < self.lr <= 1, "lr must be a number in (0, 1] (typical: 0.05)"),
                  (fin(self.anchor) and self.anchor >= 0, "anchor must be >= 0"),
                  (fin(self.beta) and self.beta >= 0, "beta must be >= 0 (0: beta_scale x the adapter's beta)"),
                  (fin(self.beta_scale) and self.beta_scale > 0, "beta_scale must be > 0"),
                  (fin(self.t_min) and fin(self.t_max) and self.t_max <= 1, "t_min/t_max must be numbers <= 1"),
                  (self.batch_size >= 1, "batch_size must be >= 1"),
                  (0 <= self.val_fraction < 1, "val_fraction must be in [0, 1)"),
                  (self.val_every >= 1, "val_every must be >= 1"),
                  (self.val_draws >= 1, "val_draws must be >= 1"),
                  (self.patience >= 0, "patience must be >= 0 (0: never stop early)")]
        for ok, msg in checks:
            if not ok:
                raise PPDError(f"tune-user: {msg}. Fix it with --set KEY=VALUE.")


class _Tokens:
    """center + sum_i c_i (e_i - center) + rms(center) * delta; ``c`` and ``delta`` start at 0 (= the start)."""

    def __init__(self, center: torch.Tensor, library: torch.Tensor | None) -> None:
        self.center = center.clone()
        self.offsets = (library - center) if library is not None else torch.zeros(0, *center.shape)
        self.scale = float(center.pow(2).mean().sqrt().clamp_min(1e-6))
        self.c = torch.nn.Parameter(torch.zeros(len(self.offsets)))
        self.delta = torch.nn.Parameter(torch.zeros_like(center))

    def __call__(self) -> torch.Tensor:
        return self.center + torch.einsum("l,ltd->td", self.c, self.offsets) + self.scale * self.delta

    def parameters(self) -> list[torch.nn.Parameter]:
        return [self.c, self.delta]

    def penalty(self) -> torch.Tensor:
        return (self() - self.center).div(self.scale).pow(2).mean()


def split_pairs(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(held-out, training) pair indices: ``round(val_fraction * n)`` held out, at least 1 (when ``val_fraction`` > 0
    and n >= 2), never all; a function of the seed only."""
    n_val = min(n - 1, max(1, round(val_fraction * n))) if val_fraction > 0 and n >= 2 else 0
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 5))
    return perm[:n_val].sort().values, perm[n_val:].sort().values


class Selection:
    """Model selection and early stopping over one phase's validations (held-out DPO loss, lower is better).

    The phase's start is the first candidate. A later one replaces the best only when it is strictly better, so a tie
    keeps the earlier one and tuning never returns something worse on the held-out pairs than its start. After
    ``patience`` validations in a row without a strict gain the phase stops (0: never stop early)."""

    def __init__(self, patience: int, start_loss: float) -> None:
        self.patience, self.best, self.bad = patience, start_loss, 0

    def offer(self, loss: float) -> bool:
        """One validation's loss -> whether it is the new best (then :attr:`stop` is False)."""
        if loss < self.best:  # NaN is never better
            self.best, self.bad = loss, 0
            return True
        self.bad += 1
        return False

    @property
    def stop(self) -> bool:
        return self.patience > 0 and self.bad >= self.patience


class UserTuner:
    """Tunes one user's tokens on ``data`` (all pairs of that user) through ``binding`` (adapter and Stage C frozen)."""

    def __init__(self, binding: PPDBinding, data: DPOData, cfg: TuneConfig, start: UserEmbedding | None = None,
                 library: Sequence[UserEmbedding] = ()) -> None:
        cfg.validate()
        if start is None and not library:
            raise PPDError("tune-user needs a start: a user embedding (--embedding), a library of user embeddings "
                           "(--library), or both.")
        embs = ([start] if start is not None else []) + list(library)
        check_compatible(embs)
        from .adapter import check_embedding

        check_embedding(binding.adapter.config, tuple(embs[0].tokens.shape), embs[0].embedder,
                        embedding_name="the starting embedding" if start is not None else "the library")
        self.binding, self.data, self.cfg, self.start = binding, data, cfg, start
        self.embedder = embs[0].embedder
        training = binding.adapter.config.training
        self.beta = cfg.beta or cfg.beta_scale * float(training.get("beta", 2500.0))
        self.t_min = cfg.t_min if cfg.t_min >= 0 else float(training.get("t_min", 0.0))
        self.t_max = cfg.t_max if cfg.t_max >= 0 else float(training.get("t_max", 1.0))
        if not 0 <= self.t_min < self.t_max <= 1:
            raise PPDError(f"tune-user: need 0 <= t_min < t_max <= 1 (got {self.t_min}, {self.t_max}).")
        lib = torch.stack([e.tokens for e in library]) if library else None
        center = start.tokens if start is not None else lib.mean(0)  # type: ignore[union-attr]
        self.tokens = _Tokens(center, lib)
        # auto: with the embedder's embedding, tune its tokens (mixing in known users did worse, docs/tune-user.md);
        # without one (cold start), mix the library first
        self.mode = cfg.mode if cfg.mode != "auto" else ("tokens" if start is not None else "mix+tokens")
        if "mix" in self.mode and not library:
            raise PPDError(f"tune-user: mode {self.mode} mixes library users; give --library, or use mode tokens.")
        self.val_idx, self.train_idx = split_pairs(len(data), cfg.val_fraction, cfg.seed)
        self.device = next(binding.unet.parameters()).device
        self.pair_inputs = pair_inputs(binding.unet)  # the base's noise schedule and conditioning
        self.step = 0  # over all phases
        self.interrupted = False
        self.on_step: Callable[[int], None] | None = None

    # ------------------------------------------------------------------------------------------------------ scoring
    def _batch_loss(self, idx: torch.Tensor, g: torch.Generator,
                    backward: Callable[[torch.Tensor], None] | None = None):
        """The DPO loss of pairs ``idx``; with ``backward``, it runs on the loss inside the user block (where
        checkpointed blocks recompute with the user attached), else no graph is built."""
        t = self.t_min + (self.t_max - self.t_min) * torch.rand(len(idx), generator=g)
        eps = torch.randn((len(idx), *self.data.latents_w.shape[1:]), generator=g)
        inputs = self.pair_inputs(self.data, idx, t, eps, self.device)
        adapter = self.binding.adapter

        def kv():
            return adapter(self.tokens()[None].to(self.device))

        def autocast():  # a bf16 Stage C (tune-user's default on CUDA) takes the float32 inputs under autocast
            return half_autocast(self.binding.unet)

        if backward is not None:
            return pair_loss(self.binding, inputs, eps, kv, self.beta, 1.0, autocast, backward)
        with torch.no_grad():
            return pair_loss(self.binding, inputs, eps, kv, self.beta, 1.0, autocast)

    def score(self, idx: torch.Tensor) -> dict:
        """DPO loss and implicit accuracy (sign of each pair's mean margin) of the current tokens on pairs ``idx``,
        with fixed draws: every call scores the same noise and timesteps. All draws of all pairs go through Stage C
        together, in chunks of at most 64 pairs."""
        if not len(idx):
            return {}
        rep = idx.repeat(self.cfg.val_draws)  # draw-major: pair i of draw d at d * len(idx) + i
        loss, margins = 0.0, torch.zeros(len(rep))
        for s in range(0, len(rep), 64):
            part = rep[s:s + 64]
            stats = self._batch_loss(part, torch.Generator().manual_seed(self.cfg.seed + 4242 + s))
            loss += float(stats.loss) * len(part) / len(rep)
            margins[s:s + len(part)] = stats.margins.float().cpu()
        mean_margin = margins.view(self.cfg.val_draws, len(idx)).mean(0)
        return {"loss": loss, "implicit_acc": (mean_margin > 0).float().mean().item()}

    # -------------------------------------------------------------------------------------------------------- phases
    def _train_step(self, opt: torch.optim.Optimizer, idx: torch.Tensor, g: torch.Generator):
        """One Adam step on pairs ``idx`` (DPO loss + the anchor); no update when that loss is not finite."""
        total: list[torch.Tensor] = []

        def backward(loss: torch.Tensor) -> None:
            total.append(loss + self.cfg.anchor * self.tokens.penalty() if self.cfg.anchor else loss)
            if torch.isfinite(total[0]):
                total[0].backward()

        opt.zero_grad(set_to_none=True)
        stats = self._batch_loss(idx, g, backward)
        # for a non-finite DPO loss pair_loss hands backward a zero-gradient stand-in: skip that step too
        if torch.isfinite(stats.loss) and torch.isfinite(total[0]):
            opt.step()
        return stats

    def _phase(self, param: torch.nn.Parameter, bar) -> dict:
        cfg, train = self.cfg, self.train_idx
        for p in self.tokens.parameters():
            p.requires_grad_(p is param)
        opt = torch.optim.Adam([param], lr=cfg.lr)
        # the phase's start is its first candidate, scored like every later one
        best = {"step": self.step, **self.score(self.val_idx), "value": param.detach().clone()}
        rule = Selection(cfg.patience, best.get("loss", math.inf))
        history = [[self.step, best.get("loss")]]
        for k in range(cfg.max_steps):
            try:
                g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)
                idx = train[torch.randperm(len(train), generator=g)[:cfg.batch_size]]
                stats = self._train_step(opt, idx, g)
                self.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{stats.loss.item():.4f}")
                if self.on_step is not None:
                    self.on_step(self.step)
                if len(self.val_idx) and ((k + 1) % cfg.val_every == 0 or k + 1 == cfg.max_steps):
                    val = self.score(self.val_idx)
                    history.append([self.step, val["loss"]])
                    if rule.offer(val["loss"]):
                        best = {"step": self.step, **val, "value": param.detach().clone()}
                    if rule.stop:
                        break
            except KeyboardInterrupt:  # Ctrl+C: stop, and keep the best so far (restored below)
                self.interrupted = True
                break
        if len(self.val_idx):
            with torch.no_grad():
                param.copy_(best.pop("value"))
        param.requires_grad_(False)
        return {**{k: v for k, v in best.items() if k != "value"}, "history": history if len(self.val_idx) else []}

    @property
    def total_steps(self) -> int:
        return self.cfg.max_steps * (2 if self.mode == "mix+tokens" else 1)

    def run(self, show_progress: bool = True,
            on_step: Callable[[int], None] | None = None) -> tuple[torch.Tensor, dict]:
        """-> (the tuned tokens, a report: held-out scores before/after, steps, the selected step of each phase).

        ``on_step(step)`` is called after every step (a progress bar, an interrupt check); a KeyboardInterrupt, there
        or anywhere in a step, stops tuning and keeps the best embedding so far (``report["interrupted"]``)."""
        self.on_step = on_step
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        phases = {"mix": ["c"], "tokens": ["delta"], "mix+tokens": ["c", "delta"]}[self.mode]
        before = self.score(self.val_idx)
        selected = {}
        bar = tqdm(total=self.total_steps, desc="tune user", unit="step", disable=not show_progress)
        unet = self.binding.unet
        was_checkpointing = set_gradient_checkpointing(unet, self.cfg.gradient_checkpointing)
        try:
            for name in phases:
                if not self.interrupted:
                    selected[name] = self._phase(getattr(self.tokens, name), bar)
        finally:
            bar.close()
            set_gradient_checkpointing(unet, was_checkpointing)  # the caller's model as it was
        after = self.score(self.val_idx)
        with torch.no_grad():
            tokens = self.tokens().detach().cpu()
        # every phase kept its start (c and delta back at 0): the tokens are the start's, bit for bit
        start_kept = all(not p.detach().any() for p in self.tokens.parameters())
        report = {"mode": self.mode, "steps": self.step, "selected": selected, "start_kept": start_kept,
                  "interrupted": self.interrupted,
                  "pairs": len(self.data), "train_pairs": len(self.train_idx), "val_pairs": len(self.val_idx),
                  "val_before": before, "val_after": after, "beta": self.beta, "t_range": [self.t_min, self.t_max],
                  "seconds": time.perf_counter() - t0, "config": asdict(self.cfg)}
        return tokens, report

    def embedding(self, tokens: torch.Tensor, report: dict, user_id: str = "", start_name: str = "",
                  library_size: int = 0, pairs_hash: str | None = None) -> UserEmbedding:
        """The tuned user as an ordinary embedding file's content (same embedder id, so adapters accept it)."""
        meta = {k: v for k, v in (self.start.meta if self.start is not None else {}).items()
                if k not in ("pair_sources", "content_hash", "mix", "mix_method", "tuned")}
        start = {"embedding": start_name or (self.start.describe() if self.start is not None else ""),
                 "library_users": library_size}
        meta.update({"user_id": user_id or meta.get("user_id", ""), "n_pairs": len(self.data),
                     "tuned": {**{k: v for k, v in report.items() if k != "config"}, "start": start,
                               "pairs_hash": pairs_hash or self.data.digest(), "tokens_hash": tensor_digest(tokens),
                               "lr": self.cfg.lr, "anchor": self.cfg.anchor, "seed": self.cfg.seed}})
        try:
            return UserEmbedding(tokens, self.embedder, meta)
        except IncompatibleError as e:  # NaN tokens: refuse to write a broken file
            raise PPDError(f"tune-user diverged ({e}); lower lr.") from None


def one_user(data: DPOData, user: str | None) -> tuple[DPOData, str]:
    """The pairs of one user of ``data``; ``user`` may be omitted when the data holds a single user."""
    if user is None:
        if len(data.user_ids) != 1:
            raise PPDError(f"The pairs hold {len(data.user_ids)} users ({', '.join(data.user_ids[:5])}...); say which "
                           "one to tune with --user.")
        user = data.user_ids[0]
    if user not in data.user_ids:
        raise PPDError(f"No pairs of user {user!r} (users: {', '.join(data.user_ids[:8])}).")
    u = data.user_ids.index(user)
    idx = torch.nonzero(data.user_idx == u).flatten()
    sub = data.subset(idx)
    return DPOData(sub.latents_w, sub.latents_l, sub.caption_idx, torch.zeros(len(idx), dtype=torch.long), sub.text,
                   sub.pooled, [user], sub.info, sub.time_ids, sub.base), user
