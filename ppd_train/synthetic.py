"""The synthetic world: the paper's synthetic-user experiment, small enough for a CPU, through the real code path.

* Latents have the base model's channels (Stage C 16, SDXL 4; ``[world] base``) at a small spatial size. Each
  caption has its own mean pattern; on top of it, K independent **style directions** (unit vectors over channels, the
  same at every position, like a colour grade) vary with standard normal strength. A tiny real ``StableCascadeUNet``
  (or SDXL ``UNet2DConditionModel``) is pre-trained (plain epsilon loss on its own noise schedule) on this
  distribution, so its samples vary along the styles.
* A user is a unit **preference vector** over the K styles; reward = the projection of a sample's style on it. Seen
  users are trained on; unseen users are new vectors, some of them mixtures of two seen users.
* Pairs are two samples of the base distribution for one caption, labelled by the user's reward. Each user's
  embedding comes from N pairs that are never trained on, through the real pair-difference embedder with a fixed
  encoder phi (a random linear map of globally pooled channels, as image encoders pool).
* PPD is trained with the real Trainer and loss; evaluation samples base and PPD from the same noise (fixed seeds).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import BASES
from .binding import PPDBinding
from .confidence import pair_confidence
from .config import to_dict
from .dpo_data import DPOData
from .embedders.pairdiff import PairDifferenceEmbedder
from .embedding import UserEmbedding
from .errors import PPDError
from .evaluate import Conditions, evaluate_users, group_summary, interpolation_curve, user_scores
from .safetensors_io import atomic_write_bytes, dumps_json
from .schedule import add_noise, sdxl_add_noise, sdxl_timesteps
from .stage_c import load_stage_c
from .tiny import build_tiny_sdxl_unet, build_tiny_stage_c
from .train import TrainConfig, Trainer


@dataclass
class WorldConfig:
    base: str = "stage_c"  # the base model: "stage_c" (16 latent channels) or "sdxl" (4)
    k_styles: int = 4
    n_captions: int = 8
    latent_size: int = 4
    style_scale: float = 1.0  # std of each style strength
    noise_scale: float = 0.3  # per-element noise on top of the caption mean and the styles
    seen_users: int = 48
    unseen_users: int = 16  # of which `unseen_mixtures` are mixtures of two seen users
    unseen_mixtures: int = 5
    pairs_per_user: int = 32  # training pairs of each seen user
    n_embed_pairs: int = 4  # N: pairs that describe a user (never trained on)
    # embeddings per seen user for training, each from its own N pairs: 16 (lr 1e-3, 800-step bases) met the
    # win-rate and interpolation targets on every world of the sweep, 8 with lr 3e-3 missed on three
    # (docs/world-sweep.md)
    embedding_views: int = 16
    embed_dim: int = 32  # output width of the fixed encoder phi
    width: int = 32  # tiny Stage C width (SDXL: its middle level's; text is this wide, pooled text half)
    # steps of the base model's pre-training; 0: the default (PRETRAIN_STEPS)
    pretrain_steps: int = 0
    pretrain_batch: int = 128
    pretrain_lr: float = 3e-3
    eval_samples: int = 24  # samples per user (fixed seeds), base vs PPD
    # a user below 50% is evaluated again with embeddings from this many other draws of its N pairs (0: not at all):
    # does the adapter fail the user, or only the draw its embedding came from?
    redraws: int = 8
    sample_steps: int = 20
    # Sampling starts at t = 0.92 (alpha_bar 0.016), not 1: near t = 1 the tiny base model's noise error is amplified
    # by 1/sqrt(alpha_bar) (100x at the top), and its samples from t = 1 sat 13x the data's noise off the data; from
    # 0.92 they sit at 1.7x with the data's style spread (measured, docs/world-sweep.md). Training stops there too.
    sample_t_start: float = 0.92


def _demo_train() -> TrainConfig:
    # token_noise 0.5: users whose taste is far from every trained user's were moved sideways without it (issue 24,
    # docs/world-sweep.md "The adapter-wrong users"); measured over the sweep's failing and passing worlds.
    # lr_schedule cosine: over the sweep's 9 worlds x 3 seeds, 26 of 27 runs meet every target (constant: 24) with half
    # the users below 50% (16 vs 31), no world shape worse (docs/world-sweep.md, "The other recipe options").
    # lr 5e-4: chosen again for the 2400-step Stage C bases: 27 of 27 runs as with 1e-3, fewer users below 50% (15 vs
    # 18), less drift (worst 1.30 vs 1.50 sd); on six worlds outside the sweep 6 of 6, 2 users below 50% (vs 4).
    return TrainConfig(batch_size=32, lr=5e-4, beta=1000.0, val_fraction=0.05, heldout_users=0.1, patience=5,
                       checkpoint_every=100, keep_checkpoints=2, log_every=10, t_min=0.02, t_max=0.92,
                       token_noise=0.5, lr_schedule="cosine")


@dataclass
class Targets:
    """What every world must reach (README, docs/world-sweep.md); ``ppd-train demo --check`` exits 1 otherwise."""

    seen_win_rate: float = 0.9
    unseen_win_rate: float = 0.8
    # fidelity (evaluate.evaluate_users): PPD samples' mean drift off the data's style distribution, in data standard
    # deviations, and their residual off the data's structure relative to the base model's
    max_drift_sd: float = 2.0
    max_noise_ratio: float = 1.1
    monotone: bool = True
    # nobody personalised backwards: no user below 50% whose own pairs agree with its preference (diagnose_users)
    adapter_wrong_users: int = 0
    # every user below 50% is one the confidence measure flags (the artist is told to pick more pairs)
    failing_flagged: bool = True


@dataclass
class DemoConfig:
    config_version: int = 1
    seed: int = 0
    out_dir: str = "runs/demo"
    # torch threads (0: leave as is). One: on 2 cores a tiny model gains nothing from a second thread, and with
    # another busy process a second thread made steps ~18x slower (benchmarks/demo_threads.py)
    threads: int = 1
    world: WorldConfig = field(default_factory=WorldConfig)
    train: TrainConfig = field(default_factory=_demo_train)
    targets: Targets = field(default_factory=Targets)


# At 800 steps the tiny SDXL's predictions barely moved along one latent direction, so no adapter could move samples
# there and users whose taste lies there were failed (issue 27). The tiny Stage C at 800 left one user failed by
# the adapter on the sweep and one on a world outside it; at 2400, none (issue 24). docs/world-sweep.md,
# "It was the base model's pre-training" and "Stage C with a longer pre-trained base".
PRETRAIN_STEPS = 2400


def pretrain_steps(cfg: WorldConfig) -> int:
    """The base model's pre-training steps: ``cfg.pretrain_steps``, or ``PRETRAIN_STEPS`` when it is 0."""
    return cfg.pretrain_steps or PRETRAIN_STEPS


def check_world(cfg: WorldConfig) -> int:
    """The latent channels of ``cfg.base``, or a refusal naming the key to change: a world needs one latent channel
    per style direction (Stage C's latents have 16 channels, SDXL's 4)."""
    if cfg.base not in ("stage_c", "sdxl"):
        raise PPDError(f"world.base = {cfg.base!r}: use \"stage_c\" or \"sdxl\".")
    ch = 16 if cfg.base == "stage_c" else 4
    if cfg.k_styles > ch:
        other = " or world.base = \"stage_c\" (16 channels)" if cfg.base == "sdxl" else ""
        raise PPDError(f"world.k_styles = {cfg.k_styles}: k_styles must be <= {ch}, the latent channels of "
                       f"{BASES[cfg.base]} (one style direction per channel at most); use world.k_styles <= "
                       f"{ch}{other}.")
    return ch


class World:
    def __init__(self, cfg: WorldConfig, seed: int) -> None:
        self.cfg = cfg
        g = torch.Generator().manual_seed(seed)
        s, k = cfg.latent_size, cfg.k_styles
        ch = self.channels = check_world(cfg)
        q, _ = torch.linalg.qr(torch.randn(ch, ch, generator=g))
        self.directions = q[:, :k].T.contiguous()  # [K, C] orthonormal over channels
        self.caption_means = 0.5 * torch.randn(cfg.n_captions, ch, s, s, generator=g)
        self.text = torch.randn(cfg.n_captions, 77, cfg.width, generator=g)
        pooled = cfg.width if cfg.base == "stage_c" else cfg.width // 2  # SDXL: the second text encoder's width
        self.pooled = torch.randn(cfg.n_captions, 1, pooled, generator=g)
        self.phi = torch.randn(cfg.embed_dim, ch, generator=g) / math.sqrt(ch)
        self.prefs: dict[str, torch.Tensor] = {}
        # per user: style differences [N, K] (preferred - dispreferred) of the N pairs its evaluation embedding was
        # made from (build_dataset); what those pairs truly say, for diagnosing users PPD fails
        self.embed_evidence: dict[str, torch.Tensor] = {}
        self.seen: list[str] = []
        self.unseen: list[str] = []
        for i in range(cfg.seen_users):
            self.prefs[f"seen{i:02d}"] = self._unit(torch.randn(k, generator=g))
            self.seen.append(f"seen{i:02d}")
        for i in range(cfg.unseen_users):
            if i < cfg.unseen_mixtures:
                a, b = torch.randperm(len(self.seen), generator=g)[:2].tolist()
                p = self._unit(self.prefs[self.seen[a]] + self.prefs[self.seen[b]])
                uid = f"mix{i:02d}"
            else:
                p, uid = self._unit(torch.randn(k, generator=g)), f"new{i:02d}"
            self.prefs[uid] = p
            self.unseen.append(uid)

    @staticmethod
    def _unit(v: torch.Tensor) -> torch.Tensor:
        return v / v.norm().clamp_min(1e-8)

    def conditions(self) -> Conditions:
        s = self.cfg.latent_size
        if self.cfg.base == "sdxl":
            return Conditions(self.text, self.pooled, 0, (4, s, s), self.cfg.sample_t_start, self.time_ids()[0])
        return Conditions(self.text, self.pooled, self.cfg.width, (16, s, s), self.cfg.sample_t_start)

    def time_ids(self, n: int = 1) -> torch.Tensor:
        """SDXL's size/crop numbers of the world's images (8 pixels per latent, uncropped), one row per sample."""
        size = 8.0 * self.cfg.latent_size
        return torch.tensor([[size, size, 0.0, 0.0, size, size]]).expand(n, 6).clone()

    def sample_data(self, caps: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        c = self.cfg
        z = c.style_scale * torch.randn(len(caps), c.k_styles, generator=g)
        style = (z @ self.directions)[:, :, None, None]
        return self.caption_means[caps] + style + c.noise_scale * torch.randn(len(caps), self.channels,
                                                                               c.latent_size, c.latent_size,
                                                                               generator=g)

    def style_of(self, x: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
        """Style strengths [B, K] of latents: channel means minus the caption's, projected on the directions."""
        return (x - self.caption_means[caps]).mean(dim=(2, 3)) @ self.directions.T

    def reward(self, uid: str, x: torch.Tensor, caps: torch.Tensor) -> torch.Tensor:
        return self.style_of(x, caps) @ self.prefs[uid]

    def fidelity(self, x: torch.Tensor, caps: torch.Tensor) -> dict[str, torch.Tensor]:
        """How a batch of latents sits in the world's data distribution, per sample (see evaluate.Fidelity).

        A caption's latents are Gaussian: its mean, a style strength ~ N(0, style^2) along each direction (the same
        at every position), and per-element noise. ``style_energy`` is the negative log-likelihood of the style
        coordinates, ``|z|^2 / (2 style^2)`` nats; ``residual`` the RMS of what remains after the mean and the styles,
        in units of the noise (about 1 for data)."""
        c = self.cfg
        x = x.float()
        z = self.style_of(x, caps)
        rest = x - self.caption_means[caps] - (z @ self.directions)[:, :, None, None]
        return {"style_energy": z.pow(2).sum(1) / (2 * c.style_scale ** 2),
                "residual": rest.pow(2).flatten(1).mean(1).sqrt() / c.noise_scale}

    def pairs(self, uid: str, n: int, g: torch.Generator):
        caps = torch.randint(self.cfg.n_captions, (n,), generator=g)
        a, b = self.sample_data(caps, g), self.sample_data(caps, g)
        a_wins = self.reward(uid, a, caps) >= self.reward(uid, b, caps)
        m = a_wins[:, None, None, None]
        return torch.where(m, a, b), torch.where(m, b, a), caps

    def embedder(self) -> PairDifferenceEmbedder:
        """phi: a fixed random linear map of globally pooled channels, like an image encoder's pooled features."""
        phi = self.phi
        return PairDifferenceEmbedder(lambda xs: torch.stack(list(xs)).mean(dim=(2, 3)) @ phi.T, "synthetic-phi")


def pretrain_base(world: World, seed: int, log=print) -> torch.nn.Module:
    """Plain epsilon-prediction training of a tiny real Stage C (or SDXL) on the world's distribution; the bases
    differ only in the model, its noising and its conditioning."""
    c = world.cfg
    if c.base == "sdxl":
        w = c.width
        unet: torch.nn.Module = build_tiny_sdxl_unet(seed=seed, widths=(w // 2, w, 2 * w), heads=(1, 2, 4),
                                                     text_widths=(w // 2, w - w // 2))
        time_ids = world.time_ids(c.pretrain_batch)

        def predict(x0, eps, t, caps):
            return unet(sdxl_add_noise(x0, eps, t), sdxl_timesteps(t), world.text[caps],
                        added_cond_kwargs=dict(text_embeds=world.pooled[caps, 0], time_ids=time_ids)).sample
    else:
        unet = build_tiny_stage_c(seed=seed, width=c.width, clip_dim=c.width)
        img = torch.zeros(c.pretrain_batch, 1, c.width)

        def predict(x0, eps, t, caps):
            return unet(add_noise(x0, eps, t), t, world.pooled[caps], world.text[caps], img).sample
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=c.pretrain_lr, weight_decay=0.0)
    steps = pretrain_steps(c)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(seed + 1)
    for step in range(steps):
        caps = torch.randint(c.n_captions, (c.pretrain_batch,), generator=g)
        x0 = world.sample_data(caps, g)
        t = torch.rand(c.pretrain_batch, generator=g) * 0.98 + 0.01
        eps = torch.randn(x0.shape, generator=g)
        loss = (predict(x0, eps, t, caps) - eps).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        sched.step()
        if (step + 1) % max(1, steps // 4) == 0:
            log(f"  pre-train base {BASES[c.base]}: step {step + 1}/{steps}, eps-loss {loss.item():.4f}")
    return unet.eval()


def build_dataset(world: World, seed: int) -> tuple[DPOData, dict[str, UserEmbedding], torch.Tensor]:
    """Training pairs of the seen users; every user's embedding from N other pairs (evaluated with); and for training,
    ``embedding_views`` embeddings per seen user, each from its own N pairs, ``[U, V, T, D]``."""
    c = world.cfg
    g = torch.Generator().manual_seed(seed + 2)
    embedder = world.embedder()
    embeddings, views, ws, ls, caps, users = {}, [], [], [], [], []
    for uid in world.seen + world.unseen:
        own = []
        for v in range(c.embedding_views if uid in world.seen else 1):
            ew, el, ec = world.pairs(uid, c.n_embed_pairs, g)
            own.append(embedder.embed_tokens(list(ew), list(el)))
            if v == 0:
                world.embed_evidence[uid] = world.style_of(ew, ec) - world.style_of(el, ec)
        meta = {"user_id": uid, "n_pairs": c.n_embed_pairs,
                "confidence": pair_confidence(own[0])}  # the pair-difference tokens are the pairs' evidence
        embeddings[uid] = UserEmbedding(own[0], embedder.id, meta)
        if uid in world.seen:
            views.append(torch.stack(own))
    for u, uid in enumerate(world.seen):
        w, lose, cap = world.pairs(uid, c.pairs_per_user, g)
        ws.append(w)
        ls.append(lose)
        caps.append(cap)
        users.append(torch.full((c.pairs_per_user,), u, dtype=torch.long))
    n = sum(len(x) for x in ws)
    sdxl = c.base == "sdxl"
    data = DPOData(torch.cat(ws), torch.cat(ls), torch.cat(caps), torch.cat(users), world.text, world.pooled,
                   list(world.seen), {"source": "synthetic", "seed": seed}, world.time_ids(n) if sdxl else None,
                   c.base)
    return data, embeddings, torch.stack(views)


# A user's N pairs "agree with" its preference when their summed style difference points within 60 degrees of it
# (cosine >= 0.5). Every labelled pair leans towards the preference (cosine > 0), so a weaker lean is a real, if
# faint, signal; below 0.5 the pairs leave most of the preference unsaid (docs/world-sweep.md, "Why a user fails").
AGREE_COS = 0.5
# the noise seed of the users' evaluation; redraws are scored on the same noise
EVAL_SEED = 1234


def diagnose_users(world: World, embeddings: dict[str, UserEmbedding], per_user: dict[str, dict]) -> None:
    """Adds to each user's metrics what its evaluation pairs truly say (``evidence_cos``: cosine between their
    summed style difference and the user's preference; ``embedding_agrees``), what the pairs alone say
    (``confidence``, ``low_confidence``: :mod:`ppd_train.confidence`), how far its taste is from the nearest other
    seen user's (``nearest_seen_cos``) and, for a user PPD fails (win rate < 50%),
    why: ``"pairs say too little"`` (its pairs do not agree with its preference) or ``"adapter is wrong"``."""
    seen = torch.stack([world.prefs[u] for u in world.seen])
    for uid, m in per_user.items():
        d = world.embed_evidence[uid].sum(0)
        cos = float(d @ world.prefs[uid] / d.norm().clamp_min(1e-12))
        conf = embeddings[uid].meta.get("confidence") or {}
        near = seen @ world.prefs[uid]
        if uid in world.seen:
            near[world.seen.index(uid)] = -1.0  # itself does not count
        m["evidence_cos"] = cos
        # how far the adapter must generalise for this user: its taste vs the nearest other seen user's
        m["nearest_seen_cos"] = float(near.max()) if len(world.seen) > 1 or uid not in world.seen else float("nan")
        m["embedding_agrees"] = cos >= AGREE_COS
        m["confidence"] = conf.get("confidence", float("nan"))
        m["low_confidence"] = bool(conf.get("low_confidence", False))
        m["failure"] = None if m["win_rate"] >= 0.5 else \
            "adapter is wrong" if m["embedding_agrees"] else "pairs say too little"


def redraw_failing(world: World, binding: PPDBinding, cond: Conditions, per_user: dict[str, dict], seed: int) -> None:
    """For every user below 50% (``failure`` from :func:`diagnose_users`), its win rate with embeddings made from
    ``world.cfg.redraws`` other draws of N fresh pairs, on the evaluation's noise: ``redraw_win_rates``,
    ``redraw_reward_gains`` and ``other_draws_win`` (most of them reach 50%). True says the adapter serves this user
    and the one draw misled it; False, that it fails the user whichever pairs describe them. The draws of a user
    depend on the seed and the user only, not on which other users fail."""
    c = world.cfg
    if c.redraws < 1:
        return
    embedder = world.embedder()
    index = {uid: i for i, uid in enumerate(world.prefs)}
    for uid, m in per_user.items():
        if not m.get("failure"):
            continue
        g = torch.Generator().manual_seed(seed + 7919 * (1 + index[uid]))
        embs = []
        for _ in range(c.redraws):
            ew, el, _caps = world.pairs(uid, c.n_embed_pairs, g)
            embs.append(UserEmbedding(embedder.embed_tokens(list(ew), list(el)), embedder.id, {"user_id": uid}))
        scores = user_scores(binding, cond, uid, embs, world.reward, c.eval_samples, EVAL_SEED, c.sample_steps)
        rates = [s["win_rate"] for s in scores]
        m["redraw_win_rates"], m["redraw_reward_gains"] = rates, [s["reward_gain"] for s in scores]
        m["other_draws_win"] = served_by_most(rates)


def served_by_most(rates: list[float]) -> bool:
    """More than half of the win rates reach 50% (4 of 8 does not)."""
    return 2 * sum(r >= 0.5 for r in rates) > len(rates)


def interpolation_pair(world: World, trained: list[str], per_user: dict[str, dict]) -> tuple[str, str]:
    """The two most opposed (by true taste) of the ``trained`` users whose evaluation pairs agree with their taste
    (``embedding_agrees`` from :func:`diagnose_users`); all of them when fewer than two agree. The interpolation
    measures how the adapter blends two users it can read: an endpoint whose 4 pairs say too little is not its user
    (its reward along the path is noise), and is already counted and flagged by the failure diagnosis."""
    agreeing = [u for u in trained if per_user[u]["embedding_agrees"]]
    pool = agreeing if len(agreeing) >= 2 else trained
    prefs = torch.stack([world.prefs[u] for u in pool])
    i, j = divmod(int((prefs @ prefs.T).argmin()), len(pool))
    return pool[i], pool[j]


def failure_counts(per_user: dict[str, dict], redrawn: bool = False) -> dict:
    """Users below 50% by cause, whether the confidence measure flagged them, and how many of them (all, and of the
    adapter-wrong ones) reach 50% with most other draws of their pairs (:func:`redraw_failing`; with ``redrawn``
    these counts are there, 0 too, when no user is below 50%)."""
    failing = [m for m in per_user.values() if m.get("failure")]
    flagged = [m for m in per_user.values() if m.get("low_confidence")]
    out = {"below_half": len(failing),
           "pairs_say_too_little": sum(m["failure"] == "pairs say too little" for m in failing),
           "adapter_wrong": sum(m["failure"] == "adapter is wrong" for m in failing),
           "failing_flagged": sum(m["low_confidence"] for m in failing),
           "flagged": len(flagged), "flagged_failing": sum(bool(m.get("failure")) for m in flagged)}
    if redrawn or any("other_draws_win" in m for m in failing):  # redraws ran (world.redraws > 0)
        out["other_draws_win"] = sum(bool(m.get("other_draws_win")) for m in failing)
        out["adapter_wrong_other_draws_win"] = sum(bool(m.get("other_draws_win")) for m in failing
                                                   if m["failure"] == "adapter is wrong")
    return out


def check_targets(metrics: dict, targets: Targets) -> list[str]:
    """The targets a demo run missed, each as one line (empty: all met)."""
    missed = []
    for group, bound in (("seen", targets.seen_win_rate), ("unseen", targets.unseen_win_rate)):
        if group in metrics and metrics[group]["win_rate"] < bound:
            missed.append(f"{group} win rate {metrics[group]['win_rate']:.0%} < {bound:.0%}")
    drift, noise = metrics["all"]["drift_sd"], metrics["all"]["noise_ratio"]
    if not drift <= targets.max_drift_sd:  # also catches NaN
        missed.append(f"fidelity: PPD samples drift {drift:.1f} sd off the data's styles > {targets.max_drift_sd:g}")
    if not noise <= targets.max_noise_ratio:
        missed.append(f"fidelity: residual off the data {noise:.2f}x the base model's > {targets.max_noise_ratio:g}")
    if targets.monotone and not metrics["interpolation"]["monotone"]:
        missed.append("interpolation is not monotone")
    f = metrics.get("failures")
    if f is not None:
        if f["adapter_wrong"] > targets.adapter_wrong_users:
            missed.append(f"{f['adapter_wrong']} user(s) below 50% although their pairs agree with their preference")
        if targets.failing_flagged and f["failing_flagged"] < f["below_half"]:
            missed.append(f"{f['below_half'] - f['failing_flagged']} user(s) below 50% not flagged low-confidence")
    return missed


def _redraws(m: dict) -> str:
    rates = m.get("redraw_win_rates")
    return f" (other draws: {sum(r >= 0.5 for r in rates)} of {len(rates)} reach 50%)" if rates else ""


def _table(metrics: dict) -> str:
    lines = [f"{'user':8s} {'group':7s} {'win rate':>8s} {'reward gain':>11s} {'drift sd':>8s} {'noise':>6s} "
             f"{'pairs cos':>9s} {'nearest':>7s} {'confid.':>7s}  why below 50%"]
    for uid, m in metrics["users"].items():
        flag = "LOW" if m.get("low_confidence") else ""
        lines.append(f"{uid:8s} {m['group']:7s} {m['win_rate']:8.0%} {m['reward_gain']:11.3f} {m['drift_sd']:8.2f} "
                     f"{m['noise_ratio']:6.2f} {m.get('evidence_cos', float('nan')):9.2f} "
                     f"{m.get('nearest_seen_cos', float('nan')):7.2f} "
                     f"{m.get('confidence', float('nan')):5.2f}{flag:>4s}  {m.get('failure') or ''}{_redraws(m)}")
    lines.append("-" * 53)
    for group in ("seen", "heldout", "unseen"):
        if group in metrics:
            m = metrics[group]
            lines.append(f"{'ALL':8s} {group:7s} {m['win_rate']:8.0%} {m['reward_gain']:11.3f} {m['drift_sd']:8.2f} "
                         f"{m['noise_ratio']:6.2f}"
                         f"   ({m['users']} users; lowest {m['min_win_rate']:.0%}, {m['below_half']:.0%} below 50%)")
    f = metrics.get("failures")
    if f:
        lines.append(f"users below 50%: {f['below_half']} ({f['pairs_say_too_little']} whose pairs say too little, "
                     f"{f['adapter_wrong']} where the adapter is wrong; {f['failing_flagged']} flagged low-confidence)."
                     f" Flagged low-confidence: {f['flagged']} users, {f['flagged_failing']} of them below 50%.")
        if f["below_half"] and "other_draws_win" in f:
            lines.append(f"given other draws of their pairs, {f['other_draws_win']} of these {f['below_half']} users "
                         f"reach 50% with most draws ({f['adapter_wrong_other_draws_win']} of the {f['adapter_wrong']}"
                         f" adapter-wrong): for those the adapter serves the taste, the one draw misled it.")
    return "\n".join(lines)


def _plot(metrics: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    users = metrics["users"]
    ids = list(users)
    palette = {"seen": "tab:blue", "heldout": "tab:grey", "unseen": "tab:orange"}
    colors = [palette[users[u]["group"]] for u in ids]
    ax1.bar(range(len(ids)), [users[u]["win_rate"] for u in ids], color=colors)
    ax1.axhline(0.5, color="grey", lw=0.8, ls="--")
    ax1.set_xticks(range(len(ids)), ids, rotation=90, fontsize=7)
    ax1.set_ylabel("win rate vs base Stage C")
    ax1.set_title("Per-user win rate (blue: seen, grey: held out for selection, orange: unseen)", fontsize=9)
    interp = metrics["interpolation"]
    a, b = interp["users"]
    w = [c["weight"] for c in interp["curve"]]
    ax2.plot(w, [c[a] for c in interp["curve"]], "o-", label=f"reward of {a}")
    ax2.plot(w, [c[b] for c in interp["curve"]], "s-", label=f"reward of {b}")
    ax2.set_xlabel(f"interpolation weight ({a} -> {b})")
    ax2.set_ylabel("mean reward")
    ax2.set_title("Interpolating two users")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


@dataclass
class TrainedWorld:
    world: World
    unet: torch.nn.Module  # StableCascadeUNet or SDXL's UNet2DConditionModel
    data: DPOData
    embeddings: dict[str, UserEmbedding]  # every user's evaluation embedding (N pairs never trained on)
    adapter_path: Path


# What the pre-trained base model depends on (World draws its styles and captions first, then the users), recorded
# beside it so that a run reusing the folder cannot silently train on a base made for another world.
PRETRAIN_FILE = "pretrain.json"
PRETRAIN_KEYS = ("base", "k_styles", "n_captions", "latent_size", "style_scale", "noise_scale", "width",
                 "pretrain_batch", "pretrain_lr")


def base_recipe(cfg: DemoConfig) -> dict:
    """The seed and world keys the base model's pre-training depends on, with its steps resolved."""
    w = to_dict(cfg.world)
    return {"seed": cfg.seed, **{k: w[k] for k in PRETRAIN_KEYS}, "pretrain_steps": pretrain_steps(cfg.world)}


def _check_reused_base(base_dir: Path, cfg: DemoConfig, log) -> None:
    name = BASES[cfg.world.base]
    try:
        recorded = json.loads((base_dir / PRETRAIN_FILE).read_text())
    except FileNotFoundError:
        log(f"  base {name}: reusing the pre-trained one in {base_dir} (made before bases recorded their "
            f"pre-training; delete the folder to pre-train it again with world.pretrain_steps = "
            f"{pretrain_steps(cfg.world)})")
        return
    except (OSError, ValueError) as e:
        recorded = e
    if not isinstance(recorded, dict):
        raise PPDError(f"{base_dir / PRETRAIN_FILE} is unreadable ({recorded!r}); delete {base_dir} and its ppd/ "
                       "folder to pre-train it again.")
    want = base_recipe(cfg)
    if diff := [f"{k} {recorded.get(k)!r} -> {v!r}" for k, v in want.items() if recorded.get(k) != v]:
        raise PPDError(f"{base_dir} holds a base model pre-trained for another world ({'; '.join(diff)}). Use "
                       "another --out for this config, or delete that folder and its ppd/ folder to start over.")
    log(f"  base {name}: reusing the pre-trained one in {base_dir}")


def train_world(cfg: DemoConfig, log=print, show_progress: bool = True) -> TrainedWorld:
    """The world, its pre-trained base model (Stage C, or SDXL with ``world.base = "sdxl"``) and a PPD adapter trained
    on its seen users, under ``out_dir``. A run that already finished there is reused (the base model and the
    trainer's own resume)."""
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    world = World(cfg.world, cfg.seed)
    log(f"synthetic world: {cfg.world.k_styles} styles, {len(world.seen)} seen + {len(world.unseen)} unseen users, "
        f"N={cfg.world.n_embed_pairs} pairs per embedding")
    base = cfg.world.base
    base_dir = out / f"base_{base}"
    if (base_dir / "config.json").is_file():
        _check_reused_base(base_dir, cfg, log)
    else:
        if any((out / "ppd").glob("*.safetensors")) or any((out / "ppd" / "checkpoints").glob("*")):
            raise PPDError(f"{out / 'ppd'} holds an adapter trained on a base model that is no longer in {base_dir}; "
                           f"a new base would be pre-trained under it. Delete {out / 'ppd'} to train again, or use "
                           "another --out.")
        pretrain_base(world, cfg.seed, log).save_pretrained(base_dir)  # type: ignore[operator]
        atomic_write_bytes(base_dir / PRETRAIN_FILE, dumps_json(base_recipe(cfg), indent=2).encode())
    if base == "sdxl":
        from .sdxl import load_sdxl

        unet: torch.nn.Module = load_sdxl(base_dir)  # the same loaders as for real weights
    else:
        unet = load_stage_c(base_dir)
    data, embeddings, user_tokens = build_dataset(world, cfg.seed)
    train_cfg = TrainConfig(**{**to_dict(cfg.train), "out_dir": str(out / "ppd"), "seed": cfg.seed,
                               base: str(base_dir)})
    trainer = Trainer(train_cfg, unet, data, user_tokens, embeddings[world.seen[0]].embedder,
                      show_progress=show_progress)
    log(f"PPD training: {len(data)} pairs of {len(data.user_ids)} seen users ({len(trainer.heldout_ids)} held out "
        f"for model selection), at most {trainer.max_steps} steps, validation every {trainer.val_every}")
    adapter_path = trainer.run()
    trainer.detach()
    return TrainedWorld(world, unet, data, embeddings, adapter_path)


def run_demo(cfg: DemoConfig, log=print, show_progress: bool = True) -> dict:
    """The whole experiment; writes metrics.json, plot.png, the adapter and the base model under ``out_dir``."""
    t0 = time.perf_counter()
    tw = train_world(cfg, log, show_progress)
    world, unet, embeddings, adapter_path = tw.world, tw.unet, tw.embeddings, tw.adapter_path
    out = Path(cfg.out_dir)

    from .adapter import load_adapter

    adapter = load_adapter(adapter_path)  # evaluate exactly what the nodes will load
    binding = PPDBinding(unet, adapter)
    cond = world.conditions()
    heldout = set(adapter.config.training.get("heldout_users", []))
    metrics = evaluate_users(binding, cond, embeddings, world.reward, set(world.seen) - heldout,
                             cfg.world.eval_samples, EVAL_SEED, steps=cfg.world.sample_steps, fidelity=world.fidelity,
                             heldout=heldout)
    metrics["all"] = group_summary(list(metrics["users"].values()))
    diagnose_users(world, embeddings, metrics["users"])
    redraw_failing(world, binding, cond, metrics["users"], cfg.seed)
    metrics["failures"] = failure_counts(metrics["users"], redrawn=cfg.world.redraws > 0)
    metrics["selected"] = adapter.config.training.get("selected")
    # interpolate between two opposed trained users: their rewards must move in opposite directions
    a, b = interpolation_pair(world, [u for u in world.seen if u not in heldout], metrics["users"])
    metrics["interpolation"] = interpolation_curve(binding, cond, embeddings[a], embeddings[b], world.reward, (a, b),
                                                   samples=cfg.world.eval_samples, steps=cfg.world.sample_steps)
    binding.detach()
    metrics["seconds"] = time.perf_counter() - t0
    metrics["missed"] = check_targets(metrics, cfg.targets)
    metrics["config"] = to_dict(cfg)
    metrics["adapter"] = str(adapter_path)
    (out / "metrics.json").write_text(dumps_json(metrics, sort_keys=False, indent=2))
    log("\n" + _table(metrics))
    curve = metrics["interpolation"]
    log(f"\ninterpolation {a} -> {b}: " + ", ".join(
        f"w={c['weight']:.2f}: {c[a]:+.2f}/{c[b]:+.2f}" for c in curve["curve"]) +
        f"  ({'monotone' if curve['monotone'] else 'NOT monotone'})")
    if _plot(metrics, out / "plot.png"):
        log(f"plot: {out / 'plot.png'}")
    sel = metrics["selected"] or {}
    log(f"adapter: step {sel.get('step')} of {adapter.config.training.get('steps')} selected by "
        f"{sel.get('metric')} = {sel.get('value')}")
    log("targets: " + ("all met" if not metrics["missed"] else "NOT met: " + "; ".join(metrics["missed"])))
    log(f"metrics: {out / 'metrics.json'}   adapter: {adapter_path}   time: {metrics['seconds']:.0f} s")
    return metrics
