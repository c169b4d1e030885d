"""Do a user's pairs say enough? An embedding confidence computed from the pairs alone.

Each pair gives one **evidence vector** ``e_i = phi(preferred) - phi(dispreferred)`` in an image encoder's feature
space (the pair-difference embedder's tokens; for the VLM embedder, its own vision tower's pooled features). A pair
says "the user's taste ``q`` points more towards e_i than away": a Bradley-Terry choice, ``P(pair as labelled) =
sigmoid(e_i . q)``. The confidence is how sure the posterior over ``q`` is of its own direction,

    confidence = |mu|^2 / (|mu|^2 + trace(Sigma))

with ``mu, Sigma`` the Laplace (Gaussian) approximation of the posterior under a standard normal prior, in the
subspace the pairs span (their principal directions holding 95% of the evidence energy, at least ``MIN_DIMS``;
evidence scaled so a typical pair has norm ``SHARPNESS``). It is 0 when the pairs say nothing, near 1 when many
diverse pairs pin the taste down.

Why this and not "do the pairs agree with each other?": agreeing pairs are *redundant*. Each pair only says which
side of a plane the taste lies on, so four pairs that all differ the same way leave every other direction open.
Measured in simulation (docs/world-sweep.md, "Why a user fails"): the pairs' mutual agreement is *anti*-correlated
with how well their evidence matches the true taste, while this posterior's certainty rises with the number of
pairs and falls with the richness of the taste space, as it should.

With 4 pairs no truth-free measure separates individual users well (they carry too little information about
themselves); what the confidence reliably says is that 4 pairs are not enough when taste has many directions.
Its growth with N follows the Spearman-Brown form ``N a / (1 + N a)`` closely (measured), which gives
``pairs_needed``.
"""

from __future__ import annotations

import math

import torch

# Flag an embedding when its confidence is below this, and aim "pick more pairs" at TARGET (chosen on the synthetic
# worlds: docs/world-sweep.md, "Why a user fails").
LOW_CONFIDENCE = 0.5
TARGET_CONFIDENCE = 0.6
SHARPNESS = 3.0  # a typical pair's evidence along the taste: P(as labelled) = sigmoid(3) = 0.95
ENERGY = 0.95
# Taste has at least this many independent directions: a user's own pairs cannot show there are fewer (four pairs
# that all differ the same way span one direction and leave the others open), so the posterior keeps at least
# min(N, MIN_DIMS) of them, directions the pairs do not cover keeping the prior's uncertainty.
MIN_DIMS = 4
MAX_PAIRS_ADVICE = 256  # beyond this "more pairs" is not advice


def pair_confidence(evidence: torch.Tensor, low: float = LOW_CONFIDENCE, target: float = TARGET_CONFIDENCE) -> dict:
    """``evidence`` ``[N, D]`` (one vector per pair, N >= 1) -> ``{"confidence", "n_pairs", "dims",
    "low_confidence", "pairs_needed"}``, plain Python values (they go into the embedding file's JSON metadata)."""
    if evidence.dim() != 2 or evidence.shape[0] < 1:
        raise ValueError(f"pair_confidence needs [N >= 1, D] evidence vectors; got {tuple(evidence.shape)}.")
    e = evidence.detach().double().cpu()
    n = e.shape[0]
    energy = e.pow(2).sum(1)
    if not torch.isfinite(energy).all() or energy.sum() <= 0:  # the encoder saw no difference in any pair
        return _result(0.0, n, 0, low, target)
    _, s, vh = torch.linalg.svd(e, full_matrices=True)
    share = (s ** 2).cumsum(0) / (s ** 2).sum()
    dims = max(int((share < ENERGY - 1e-12).sum()) + 1, min(n, MIN_DIMS, e.shape[1]))
    x = e @ vh[:dims].T
    x = x * (SHARPNESS / energy.mean().sqrt())
    q = torch.zeros(dims, dtype=x.dtype)
    eye = torch.eye(dims, dtype=x.dtype)
    for _ in range(50):  # Newton on a strictly concave log-posterior: converges in a handful of steps
        p = torch.sigmoid(x @ q)
        hess = x.T @ (x * (p * (1 - p))[:, None]) + eye
        step = torch.linalg.solve(hess, x.T @ (1 - p) - q)
        q = q + step
        if step.norm() < 1e-10:
            break
    p = torch.sigmoid(x @ q)
    cov = torch.linalg.inv(x.T @ (x * (p * (1 - p))[:, None]) + eye)
    mu2 = float(q @ q)
    return _result(mu2 / (mu2 + float(cov.trace())), n, dims, low, target)


def _result(conf: float, n: int, dims: int, low: float, target: float) -> dict:
    return {"confidence": conf, "n_pairs": n, "dims": dims, "low_confidence": conf < low,
            "pairs_needed": pairs_needed(conf, n, target)}


def pairs_needed(conf: float, n: int, target: float = TARGET_CONFIDENCE) -> int | None:
    """Pairs whose confidence would reach ``target``, from ``conf`` at ``n`` pairs with the Spearman-Brown form
    ``N a / (1 + N a)`` (None: more than MAX_PAIRS_ADVICE, or no evidence at all)."""
    if conf <= 0:
        return None
    if conf >= target:
        return n
    a = conf / (n * (1.0 - conf))
    need = math.ceil(target / ((1.0 - target) * a) - 1e-9)
    return need if need <= MAX_PAIRS_ADVICE else None


def advice(conf: dict, have: int | None = None) -> str:
    """One line an artist can act on. ``have``: the pairs the user holds now, when more than the embedding was made
    from (the Preference Picker counts down while its pair set grows); by default the embedding's own pairs."""
    head = f"pair confidence {conf['confidence']:.2f} from {conf['n_pairs']} pairs"
    if not conf["low_confidence"]:
        return head + " (ok)"
    need = conf["pairs_needed"]
    if need is None:
        return head + ": LOW - these pairs show no difference your taste could be read from; check them, or pick " \
                      "many more pairs."
    if have is not None and have > conf["n_pairs"] and have >= need:  # the set grew past what was embedded
        return head + f": LOW - these pairs say too little about your taste; about {need} in all would do and " \
                      f"you have {have}: embed again from all of them (the Pair Loader's num_pairs) or tune the " \
                      "user on them."
    have = conf["n_pairs"] if have is None else have
    more = max(1, need - have)  # flagged low means more pairs, even where a custom low bound exceeds the target
    return head + f": LOW - these pairs say too little about your taste; pick about {more} more (about " \
                  f"{have + more} in all) with the Preference Picker, then embed again or tune the user."


def confidence_text(meta: dict, have: int | None = None) -> str:
    """The line the nodes show for an embedding's metadata (files from before confidence existed say so); ``have``
    as in :func:`advice`."""
    conf = meta.get("confidence")
    if conf is None and "mix" in meta:
        return "pair confidence: not measured (a blend of users, not made from pairs)"
    if conf is None:
        return "pair confidence: not measured (an embedding made before this version)"
    if not isinstance(conf, dict):
        return "pair confidence: unreadable (the embedding's 'confidence' metadata is not a table; embed the " \
               "pairs again)"
    if missing := sorted(_KEYS - conf.keys()):
        return f"pair confidence: unreadable (the embedding's 'confidence' metadata lacks {', '.join(missing)}; " \
               "embed the pairs again)"
    return advice(conf, have)


_KEYS = {"confidence", "n_pairs", "low_confidence", "pairs_needed"}  # what advice reads
