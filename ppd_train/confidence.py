"""Do a user's pairs say enough? An embedding confidence computed from the pairs alone.

Each pair gives one **evidence vector** ``e_i = phi(preferred) - phi(dispreferred)`` in an image encoder's feature
space (the pair-difference embedder's tokens; for the VLM embedder, its own vision tower's pooled features). Model
them as ``e_i = s + n_i``: a direction ``s`` the user's taste shares across pairs plus what differs from pair to pair
(the other ways two images differ), independent between pairs. Then, over distinct pairs ``i != j``,

    mean(e_i . e_j) estimates |s|^2                      (the noise terms average out: it is unbiased)
    mean(e_i . e_i) estimates |s|^2 + E|n|^2

so ``snr = |s|^2 / E|n|^2`` is estimated from the pairs themselves, and the **reliability** of N pairs,

    reliability(N) = N * snr / (1 + N * snr)

is the expected squared cosine between the N pairs' mean evidence and the shared direction (Spearman-Brown; 1 = the
pairs agree, 0 = they share nothing). Because it is a function of N, it also says how many pairs would reach a
target: ``pairs_needed``. Pairs that contradict each other give ``snr <= 0``: reliability 0, more pairs needed than
any artist would pick (reported as None).

The threshold that flags a user (``LOW_RELIABILITY``) was chosen on the synthetic worlds, where each user's true
preference is known (docs/world-sweep.md, "Why a user fails").
"""

from __future__ import annotations

import math

import torch

# Flag an embedding when its pairs' reliability is below this (measured on the synthetic worlds: see module doc).
LOW_RELIABILITY = 0.5
# The reliability "pick more pairs" aims for.
TARGET_RELIABILITY = 0.7
MAX_PAIRS_ADVICE = 256  # beyond this "more pairs" is not advice: the pairs contradict each other


def pair_confidence(evidence: torch.Tensor, low: float = LOW_RELIABILITY,
                    target: float = TARGET_RELIABILITY) -> dict:
    """``evidence`` ``[N, D]`` (one vector per pair, N >= 2) -> ``{"reliability", "snr", "n_pairs", "low_confidence",
    "pairs_needed"}``, all plain Python values (they go into the embedding file's JSON metadata)."""
    if evidence.dim() != 2 or evidence.shape[0] < 2:
        raise ValueError(f"pair_confidence needs [N >= 2, D] evidence vectors; got {tuple(evidence.shape)}.")
    e = evidence.detach().double()
    n = e.shape[0]
    gram = e @ e.T
    total = gram.diagonal().mean().item()
    shared = (gram.sum().item() - gram.diagonal().sum().item()) / (n * (n - 1))
    if total <= 0 or not math.isfinite(total):  # every pair's two images were identical to the encoder
        snr = 0.0
    else:
        snr = max(shared, 0.0) / max(total - shared, 1e-12 * total)
    rel = reliability(n, snr)
    needed = pairs_needed(snr, target)
    return {"reliability": rel, "snr": snr, "n_pairs": n, "low_confidence": rel < low,
            "pairs_needed": needed}


def reliability(n: int, snr: float) -> float:
    return n * snr / (1.0 + n * snr) if snr > 0 else 0.0


def pairs_needed(snr: float, target: float = TARGET_RELIABILITY) -> int | None:
    """The number of pairs whose reliability reaches ``target`` (None: more than MAX_PAIRS_ADVICE)."""
    if snr <= 0:
        return None
    n = math.ceil(target / ((1.0 - target) * snr) - 1e-9)
    return max(n, 2) if n <= MAX_PAIRS_ADVICE else None


def advice(conf: dict) -> str:
    """One line an artist can act on."""
    rel, n = conf["reliability"], conf["n_pairs"]
    head = f"pair confidence {rel:.2f} from {n} pairs"
    if not conf["low_confidence"]:
        return head + " (ok)"
    need = conf["pairs_needed"]
    if need is None:
        return head + ": LOW - these pairs contradict each other; check them, or pick many more pairs."
    return head + f": LOW - these pairs say too little about your taste; pick about {max(need - n, 1)} more " \
                  f"(about {need} in all)."


def confidence_text(meta: dict) -> str:
    """The line the nodes show for an embedding's metadata (files from before confidence existed say so)."""
    conf = meta.get("confidence")
    if not isinstance(conf, dict):
        n = meta.get("n_pairs")
        return "pair confidence: not measured" + (" (one pair cannot be checked against another)" if n == 1 else "")
    return advice(conf)
