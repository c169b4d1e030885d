"""Do the pairs say enough? The embedding confidence (ppd_train/confidence.py), hand-computed, and where it is made:
by both embedders, saved in the embedding file, shown by the VLM User Embedder node; and the synthetic world's
diagnosis of a user PPD fails."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_image

from ppd_train.confidence import LOW_RELIABILITY, advice, confidence_text, pair_confidence, pairs_needed, reliability
from ppd_train.embedders.vlm import VLMEmbedder
from ppd_train.embedding import UserEmbedding
from ppd_train.pairs import pairs_from_images


def test_hand_computed_two_pairs():
    # e1 = (1, 0), e2 = (1, 2): cross product 1, mean square (1 + 5) / 2 = 3 -> snr = 1 / (3 - 1) = 0.5
    conf = pair_confidence(torch.tensor([[1.0, 0.0], [1.0, 2.0]]))
    assert conf["snr"] == pytest.approx(0.5)
    assert conf["reliability"] == pytest.approx(2 * 0.5 / (1 + 2 * 0.5))  # 0.5
    assert conf["n_pairs"] == 2 and conf["low_confidence"] is (0.5 < LOW_RELIABILITY)
    # reaching 0.7 needs n * 0.5 / (1 + n * 0.5) >= 0.7 -> n >= 4.67 -> 5 pairs
    assert conf["pairs_needed"] == 5 and reliability(5, 0.5) >= 0.7 > reliability(4, 0.5)


def test_agreeing_pairs_are_confident_and_contradicting_ones_are_not():
    same = torch.tensor([[1.0, 2.0, 0.5]]).repeat(4, 1)
    conf = pair_confidence(same)
    assert conf["reliability"] > 0.999 and not conf["low_confidence"] and conf["pairs_needed"] == 2
    contra = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0], [0.0, -1.0]])  # every pair undone by another
    conf = pair_confidence(contra)
    assert conf["snr"] == 0 and conf["reliability"] == 0 and conf["low_confidence"]
    assert conf["pairs_needed"] is None and "contradict" in advice(conf)
    assert pair_confidence(torch.zeros(4, 3))["reliability"] == 0  # the encoder saw no difference at all


def test_the_order_and_the_sign_convention():
    g = torch.Generator().manual_seed(0)
    e = torch.randn(6, 8, generator=g) + torch.tensor([2.0] + [0.0] * 7)
    a, b = pair_confidence(e), pair_confidence(e[torch.randperm(6, generator=g)])
    assert a["reliability"] == pytest.approx(b["reliability"])  # pairs are a set
    # every pair flipped (the user prefers the other image each time) shares the flipped direction just as much
    assert pair_confidence(-e)["reliability"] == pytest.approx(a["reliability"])
    # one pair flipped against the others lowers it
    flipped = e.clone()
    flipped[0] = -flipped[0]
    assert pair_confidence(flipped)["reliability"] < a["reliability"]


def test_the_estimate_recovers_a_known_signal_to_noise():
    # e_i = s + n_i with |s|^2 = 1 and E|n|^2 = D * sigma^2 = 16 * 0.25 = 4: snr 0.25
    g = torch.Generator().manual_seed(1)
    s = torch.zeros(16)
    s[3] = 1.0
    e = s + 0.5 * torch.randn(4000, 16, generator=g)
    conf = pair_confidence(e)
    assert conf["snr"] == pytest.approx(0.25, rel=0.1)
    # and the reliability it predicts for N pairs is what N pairs' mean evidence really reaches: cos^2 with s
    n = 4
    cos2 = [float((m @ s) ** 2 / (m @ m)) for m in e[: 1000 * n].view(1000, n, 16).mean(1)]
    assert sum(cos2) / len(cos2) == pytest.approx(reliability(n, 0.25), abs=0.05)


def test_more_pairs_more_reliable_and_the_advice_counts_them():
    assert [round(reliability(n, 0.2), 3) for n in (1, 4, 16)] == [0.167, 0.444, 0.762]
    assert pairs_needed(0.2, 0.7) == 12 and pairs_needed(0.0) is None and pairs_needed(1e-4) is None
    conf = {"reliability": 0.3, "n_pairs": 4, "low_confidence": True, "pairs_needed": 12}
    assert "pick about 8 more (about 12 in all)" in advice(conf)
    assert advice({**conf, "low_confidence": False}).endswith("(ok)")
    assert confidence_text({"n_pairs": 4}) == "pair confidence: not measured"
    assert confidence_text({"confidence": conf}) == advice(conf)
    with pytest.raises(ValueError, match="N >= 2"):
        pair_confidence(torch.ones(1, 3))


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
    assert emb.meta["confidence"]["reliability"] == pytest.approx(expected["reliability"], rel=1e-4)
    # a pair set where every pair is the same pair: the pairs agree perfectly
    same = embedder.embed([[pairs[0]] * 4])[0]
    assert same.meta["confidence"]["reliability"] > 0.999
    # batched users each get their own pairs' confidence
    other = _user(4)
    both = VLMEmbedder(tiny_llava_dir, mode="direct", batch_size=2).embed([pairs, other])
    assert both[0].meta["confidence"]["reliability"] == pytest.approx(expected["reliability"], rel=1e-3)
    assert both[1].meta["confidence"]["reliability"] == pytest.approx(
        embedder.embed([other])[0].meta["confidence"]["reliability"], rel=1e-3)
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
    counts = failure_counts(per_user)
    assert counts["below_half"] == 3 and counts["adapter_wrong"] + counts["pairs_say_too_little"] == 3
    assert counts["adapter_wrong"] == 1 + (per_user[ids[4]]["failure"] == "adapter is wrong")
    assert counts["failing_flagged"] == sum(per_user[u]["low_confidence"] for u in (ids[0], ids[1], ids[4]))
