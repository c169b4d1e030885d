"""Do the pairs say enough? The embedding confidence (ppd_train/confidence.py), hand-computed, and where it is made:
by both embedders, saved in the embedding file, shown by the VLM User Embedder node; and the synthetic world's
diagnosis of a user PPD fails."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_image

from ppd_train.confidence import (
    LOW_CONFIDENCE,
    MIN_DIMS,
    SHARPNESS,
    TARGET_CONFIDENCE,
    advice,
    confidence_text,
    pair_confidence,
    pairs_needed,
)
from ppd_train.embedders.vlm import VLMEmbedder
from ppd_train.embedding import UserEmbedding
from ppd_train.pairs import pairs_from_images


def _scalar_posterior(a: float) -> float:
    """The one-direction case by another route: the MAP of log sigmoid(a q) - q^2 / 2 by bisection, then the
    Laplace variance 1 / (a^2 s (1 - s) + 1)."""
    lo, hi = 0.0, 10.0
    for _ in range(200):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if a * (1 - 1 / (1 + math.exp(-a * mid))) - mid > 0 else (lo, mid)
    s = 1 / (1 + math.exp(-a * lo))
    var = 1 / (a * a * s * (1 - s) + 1)
    return lo * lo / (lo * lo + var)


def test_hand_computed_one_pair():
    conf = pair_confidence(torch.tensor([[0.0, 7.0, 0.0]]))  # scaled to SHARPNESS: one coordinate of 3
    assert conf["dims"] == 1 and conf["n_pairs"] == 1
    assert conf["confidence"] == pytest.approx(_scalar_posterior(SHARPNESS), rel=1e-6)
    assert conf["low_confidence"] is (conf["confidence"] < LOW_CONFIDENCE)
    # scale and sign free: the evidence is normalised, and the label says which side is preferred
    assert pair_confidence(torch.tensor([[0.0, -0.01, 0.0]]))["confidence"] == pytest.approx(conf["confidence"])


def test_redundant_pairs_say_less_than_diverse_ones():
    same = pair_confidence(torch.tensor([[1.0, 2.0, 0.5, 0.0, 0.0]]).repeat(4, 1))
    diverse = pair_confidence(torch.tensor([[1.0, 0.3, 0.0, 0.0, 0.2], [0.3, 1.0, 0.1, 0.0, 0.0],
                                            [0.2, 0.0, 1.0, 0.3, 0.0], [0.0, 0.1, 0.3, 1.0, 0.2]]))
    # four copies of one pair leave every other direction of taste open (MIN_DIMS of them at least)
    assert same["dims"] == MIN_DIMS and diverse["dims"] == MIN_DIMS
    assert same["confidence"] < diverse["confidence"]
    assert pair_confidence(torch.zeros(4, 3)) == {"confidence": 0.0, "n_pairs": 4, "dims": 0,
                                                   "low_confidence": True, "pairs_needed": None}


def test_order_free_and_growing_with_the_number_of_pairs():
    g = torch.Generator().manual_seed(0)
    pref = torch.tensor([1.0, -0.5, 0.3, 0.2, 0.0, 0.4])
    dz = torch.randn(64, 6, generator=g)
    dz = dz * torch.sign(dz @ pref)[:, None]  # each pair labelled by the user's taste
    evidence = dz @ torch.randn(6, 24, generator=g)  # seen through an encoder
    full = pair_confidence(evidence[:8])
    assert pair_confidence(evidence[:8][torch.randperm(8, generator=g)])["confidence"] == pytest.approx(
        full["confidence"])
    curve = [pair_confidence(evidence[:n])["confidence"] for n in (4, 8, 16, 32, 64)]
    assert curve == sorted(curve) and curve[0] < LOW_CONFIDENCE < curve[-1]
    # the advice from 4 pairs points to about as many pairs as it takes
    need = pair_confidence(evidence[:4])["pairs_needed"]
    reached = next(n for n in (4, 8, 16, 32, 64) if pair_confidence(evidence[:n])["confidence"] >= TARGET_CONFIDENCE)
    assert need is not None and reached / 2 <= need <= reached * 2


def test_pairs_needed_and_the_advice():
    # Spearman-Brown: 0.3 at 4 pairs -> a = 0.3 / (4 * 0.7); reaching 0.6 needs 0.6 / (0.4 a) = 14 pairs
    assert pairs_needed(0.3, 4, 0.6) == 14 and pairs_needed(0.7, 4, 0.6) == 4
    assert pairs_needed(0.0, 4) is None and pairs_needed(1e-4, 4) is None
    conf = {"confidence": 0.3, "n_pairs": 4, "low_confidence": True, "pairs_needed": 14}
    assert "pick about 10 more (about 14 in all)" in advice(conf)
    assert advice({**conf, "low_confidence": False}).endswith("(ok)")
    assert "no difference" in advice({**conf, "pairs_needed": None})
    assert confidence_text({"n_pairs": 4}).startswith("pair confidence: not measured")
    assert confidence_text({"confidence": conf}) == advice(conf)
    assert "pick about 6 more (about 14 in all)" in confidence_text({"confidence": conf}, have=8)
    # a blend of users was not made from pairs; a damaged entry is named, never a raw KeyError
    assert confidence_text({"mix": [{"user": "a", "weight": 1.0}]}).endswith("(a blend of users, not made from pairs)")
    assert "lacks low_confidence, pairs_needed;" in confidence_text({"confidence": {"confidence": 0.3, "n_pairs": 4}})
    assert "is not a table" in confidence_text({"confidence": 0.3})
    with pytest.raises(ValueError, match="N >= 1"):
        pair_confidence(torch.ones(3))


def _user(seed: int, n: int = 4):
    a = [random_image(seed * 100 + i) for i in range(n)]
    b = [random_image(seed * 100 + 50 + i) for i in range(n)]
    return pairs_from_images([f"caption {seed}"], a, b, user_id=f"user{seed}")


def test_vlm_evidence_is_its_vision_towers_pair_difference(tiny_llava_dir, tmp_path):
    embedder = VLMEmbedder(tiny_llava_dir, mode="direct")
    pairs = _user(3)
    emb = embedder.embed([pairs])[0]
    inputs = embedder._inputs([pairs])
    with torch.inference_mode():
        feats = embedder.model.model.vision_tower(pixel_values=inputs["pixel_values"][:, 0]).last_hidden_state
    feats = feats.float().mean(1)
    evidence = feats[0::2] - feats[1::2]  # images go preferred, dispreferred, pair by pair
    expected = pair_confidence(evidence)
    assert emb.meta["confidence"]["confidence"] == pytest.approx(expected["confidence"], rel=1e-4)
    # a pair set where every pair is the same pair says less than four different pairs
    same = embedder.embed([[pairs[0]] * 4])[0]
    assert same.meta["confidence"]["dims"] == MIN_DIMS
    assert same.meta["confidence"]["confidence"] == pytest.approx(pair_confidence(evidence[:1].repeat(4, 1))[
        "confidence"], rel=1e-4)
    # batched users each get their own pairs' confidence
    other = _user(4)
    both = VLMEmbedder(tiny_llava_dir, mode="direct", batch_size=2).embed([pairs, other])
    assert both[0].meta["confidence"]["confidence"] == pytest.approx(expected["confidence"], rel=1e-3)
    assert both[1].meta["confidence"]["confidence"] == pytest.approx(
        embedder.embed([other])[0].meta["confidence"]["confidence"], rel=1e-3)
    # it travels in the embedding file
    emb.save(tmp_path / "u.safetensors")
    assert UserEmbedding.load(tmp_path / "u.safetensors").meta["confidence"] == emb.meta["confidence"]


def test_vlm_user_embedder_node_shows_it(pack, tiny_llava_dir):
    import importlib

    nodes = importlib.import_module(f"{pack.__name__}.nodes.embedder_nodes")
    node = nodes.PPDVLMUserEmbedder
    assert node.RETURN_NAMES[2] == "confidence" and node.RETURN_TYPES[2] == "STRING"
    # the node's job without ComfyUI's progress bar (tests/comfyui run the node itself in a real ComfyUI)
    emb = nodes.embed_pairs(nodes.VLMHandle(tiny_llava_dir, "fp32"), _user(5), "direct", "all", 16,
                            torch.device("cpu"))
    text = confidence_text(emb.meta)
    assert text == advice(emb.meta["confidence"]) and text.startswith("pair confidence ")


def test_the_world_diagnoses_a_failing_user():
    from ppd_train.synthetic import AGREE_COS, World, WorldConfig, build_dataset, diagnose_users, failure_counts

    world = World(WorldConfig(k_styles=3, seen_users=4, unseen_users=2, unseen_mixtures=1, pairs_per_user=4,
                              embedding_views=2), seed=0)
    _, embeddings, _ = build_dataset(world, seed=0)
    for uid, ev in world.embed_evidence.items():
        assert ev.shape == (4, 3)
        assert (ev @ world.prefs[uid] >= 0).all()  # each of its pairs was labelled by the user's own reward
        # and the embedding's tokens are exactly those pairs' evidence as the encoder phi sees it
        assert embeddings[uid].meta["confidence"] == pair_confidence(embeddings[uid].tokens)
    ids = list(world.prefs)
    per_user = {u: {"win_rate": w} for u, w in zip(ids, [0.0, 0.0, 1.0, 0.5, 0.2, 1.0])}
    # make user 0's pairs agree with its preference and user 1's not
    world.embed_evidence[ids[0]] = world.prefs[ids[0]].repeat(4, 1)
    orth = torch.linalg.svd(world.prefs[ids[1]][None]).Vh[1]  # a direction orthogonal to user 1's preference
    world.embed_evidence[ids[1]] = (0.1 * world.prefs[ids[1]] + orth).repeat(4, 1)
    diagnose_users(world, embeddings, per_user)
    assert per_user[ids[0]]["evidence_cos"] == pytest.approx(1.0)
    assert per_user[ids[0]]["embedding_agrees"] and per_user[ids[0]]["failure"] == "adapter is wrong"
    cos1 = 0.1 / math.sqrt(1.01)
    assert per_user[ids[1]]["evidence_cos"] == pytest.approx(cos1, abs=1e-5) and cos1 < AGREE_COS
    assert per_user[ids[1]]["failure"] == "pairs say too little"
    assert per_user[ids[2]]["failure"] is None and per_user[ids[3]]["failure"] is None  # 50% is not below 50%
    for m in per_user.values():
        assert isinstance(m["embedding_agrees"], bool) and isinstance(m["low_confidence"], bool)
    # how far each taste is from the nearest *other* seen user's (a seen user does not count itself)
    seen = torch.stack([world.prefs[u] for u in world.seen])
    for uid, m in per_user.items():
        others = [float(seen[i] @ world.prefs[uid]) for i, s in enumerate(world.seen) if s != uid]
        assert m["nearest_seen_cos"] == pytest.approx(max(others), abs=1e-6) and m["nearest_seen_cos"] < 1 - 1e-6
    counts = failure_counts(per_user)
    assert counts["below_half"] == 3 and counts["adapter_wrong"] + counts["pairs_say_too_little"] == 3
    assert counts["adapter_wrong"] == 1 + (per_user[ids[4]]["failure"] == "adapter is wrong")
    assert counts["failing_flagged"] == sum(per_user[u]["low_confidence"] for u in (ids[0], ids[1], ids[4]))


def test_embed_command_saves_and_reports_it(tmp_path, capsys):
    from helpers import write_pair_folder, write_tiny_clip_vision

    from ppd_train.cli import main
    from ppd_train.embedding import load_embedding_table

    write_tiny_clip_vision(tmp_path / "clip")
    folders = [write_pair_folder(tmp_path / name, n=5, seed=s, user_id=name) for s, name in enumerate(("ann", "bo"))]
    out = tmp_path / "users.safetensors"
    assert main(["embed", "--pairs", *map(str, folders), "--clip", str(tmp_path / "clip"), "--out", str(out),
                 "--quiet"]) in (0, None)
    table, _ = load_embedding_table(out)
    for emb in table.values():
        assert emb.meta["confidence"] == pair_confidence(emb.tokens)  # pair-difference tokens are the evidence
    low = sorted(u for u, e in table.items() if e.meta["confidence"]["low_confidence"])
    err = capsys.readouterr().err
    assert low and f"{len(low)} of 2 users have low pair confidence ({', '.join(low)})" in err


def test_the_targets_count_the_failures():
    from ppd_train.synthetic import Targets, check_targets

    base = {"seen": {"win_rate": 1.0}, "unseen": {"win_rate": 1.0}, "all": {"drift_sd": 0.1, "noise_ratio": 1.0},
            "interpolation": {"monotone": True}}
    ok = {"below_half": 2, "pairs_say_too_little": 2, "adapter_wrong": 0, "failing_flagged": 2}
    assert check_targets({**base, "failures": ok}, Targets()) == []
    assert check_targets({**base, "failures": {**ok, "adapter_wrong": 1, "pairs_say_too_little": 1}}, Targets()) == [
        "1 user(s) below 50% although their pairs agree with their preference"]
    assert check_targets({**base, "failures": {**ok, "failing_flagged": 1}}, Targets()) == [
        "1 user(s) below 50% not flagged low-confidence"]
    assert check_targets({**base, "failures": {**ok, "failing_flagged": 1}}, Targets(failing_flagged=False)) == []
    assert check_targets({**base, "failures": {**ok, "adapter_wrong": 1}}, Targets(adapter_wrong_users=1)) == []
    assert check_targets(base, Targets()) == []  # a run from before the diagnosis


def test_orthogonal_pairs_are_independent_one_pair_posteriors():
    """Equal, orthogonal pairs: every direction holds one pair of strength SHARPNESS (the evidence is scaled by the
    mean pair energy), so the confidence is the one-pair value, and every direction up to the 95% energy share is
    kept: 8 of 8, and 19 of 20 (the 20th would pass 95% exactly)."""
    one = _scalar_posterior(SHARPNESS)
    for n, dims in ((2, 2), (8, 8), (20, 19)):
        conf = pair_confidence(7.0 * torch.eye(n))
        assert conf["dims"] == dims and conf["n_pairs"] == n
        assert conf["confidence"] == pytest.approx(one, rel=1e-6)
    assert pair_confidence(torch.randn(4, 2, generator=torch.Generator().manual_seed(0)))["dims"] == 2  # D < 4
    with pytest.raises(ValueError, match="N >= 1"):
        pair_confidence(torch.zeros(0, 3))


def test_the_flag_and_the_advice_use_the_bounds_given():
    e = torch.tensor([[0.0, 7.0, 0.0]])
    conf = pair_confidence(e)["confidence"]
    assert pair_confidence(e, low=conf)["low_confidence"] is False  # at the bound: not low
    assert pair_confidence(e, low=conf + 1e-9)["low_confidence"] is True
    assert pair_confidence(e, target=0.9)["pairs_needed"] == pairs_needed(conf, 1, 0.9) != pairs_needed(conf, 1)
    # the largest advice is MAX_PAIRS_ADVICE pairs: 1/17 at 16 pairs reaches 0.5 at exactly 256
    assert pairs_needed(1 / 17, 16, 0.5) == 256 and pairs_needed(0.0588, 16, 0.5) is None
    low = {"confidence": 0.3, "n_pairs": 4, "low_confidence": True}
    assert advice({**low, "pairs_needed": None}) == (
        "pair confidence 0.30 from 4 pairs: LOW - these pairs show no difference your taste could be read from; "
        "check them, or pick many more pairs.")
    # flagged low with a target already met (a low bound above the target): at least one more pair
    assert "pick about 1 more (about 5 in all)" in advice({**low, "pairs_needed": 4})
    # the set grew past the embedded pairs and holds enough: embed again; the embedding's own pairs never do
    assert "you have 6: embed again" in advice({**low, "pairs_needed": 5}, have=6)
    assert "pick about 1 more (about 5 in all)" in advice({**low, "pairs_needed": 4}, have=4)


def test_the_ceiling_oracle_is_the_exact_posterior_mean():
    """benchmarks/confidence_sim.py's oracle (the AUC ceiling docs/world-sweep.md quotes) against two posteriors
    computed by hand on the circle: one pair (1, 0) leaves the half circle x > 0, E[cos] = E[x] = 2 / pi; two
    orthogonal pairs leave the quarter circle, summed evidence (1, 1), E[cos] = 2 sqrt(2) / pi."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "confidence_sim.py"
    spec = importlib.util.spec_from_file_location("confidence_sim", path)
    assert spec is not None and spec.loader is not None
    sim = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sim)
    sphere = torch.randn(400_000, 2, generator=torch.Generator().manual_seed(0))
    sphere = sphere / sphere.norm(dim=1, keepdim=True)
    one = torch.tensor([[1.0, 0.0]])
    assert sim.oracle(one, one.sum(0), sphere) == pytest.approx(2 / math.pi, abs=0.003)
    two = torch.tensor([[2.0, 0.0], [0.0, 0.5]])  # magnitudes do not change the cone, only the summed evidence
    d = torch.tensor([1.0, 1.0])
    assert sim.oracle(two, d, sphere) == pytest.approx(2 * math.sqrt(2) / math.pi, abs=0.003)
    assert math.isnan(sim.oracle(torch.tensor([[1.0, 0.0], [-1.0, 1e-5]]), d, sphere))  # a sliver: too few samples
