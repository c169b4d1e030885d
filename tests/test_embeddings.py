"""User embeddings: file format, interpolation, the VLM and pair-difference embedders, and the resumable embed job."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_image, write_pair_folder

from ppd_train.embed_dataset import embed_users
from ppd_train.embedders.vlm import VLMEmbedder, build_prompt
from ppd_train.embedding import UserEmbedding, interpolate, load_embedding_table, mix
from ppd_train.errors import FileFormatError, IncompatibleError, PPDError
from ppd_train.pairs import load_pair_folder, pairs_from_images


def _emb(seed, embedder="vlm:x:direct:all", shape=(3, 8)):
    return UserEmbedding(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), embedder,
                         {"user_id": f"u{seed}"})


def test_file_round_trip_and_refusals(tmp_path):
    e = _emb(0)
    e.meta["profile"] = "likes warm light"
    e.save(tmp_path / "alice.safetensors")
    back = UserEmbedding.load(tmp_path / "alice.safetensors")
    assert torch.equal(back.tokens, e.tokens) and back.embedder == e.embedder and back.profile == "likes warm light"
    with pytest.raises(IncompatibleError, match="NaN or infinite"):
        UserEmbedding(torch.tensor([[1.0, float("nan")]]), "x")
    from helpers import trained_looking_adapter

    from ppd_train.adapter import save_adapter
    from ppd_train.tiny import build_tiny_stage_c

    save_adapter(trained_looking_adapter(build_tiny_stage_c()), tmp_path / "adapter.safetensors")
    with pytest.raises(FileFormatError, match="not a user embedding"):
        UserEmbedding.load(tmp_path / "adapter.safetensors")


def test_interpolation_endpoints_are_exact():
    a, b = _emb(1), _emb(2)
    for method in ("lerp", "slerp"):
        assert torch.equal(interpolate(a, b, 0.0, method).tokens, a.tokens)
        assert torch.equal(interpolate(a, b, 1.0, method).tokens, b.tokens)
        mid = interpolate(a, b, 0.5, method).tokens
        assert not torch.equal(mid, a.tokens) and torch.isfinite(mid).all()
    torch.testing.assert_close(interpolate(a, b, 0.25).tokens, 0.75 * a.tokens + 0.25 * b.tokens)
    slerp = interpolate(a, b, 0.5, "slerp").tokens  # norms interpolate linearly
    torch.testing.assert_close(slerp.norm(dim=-1), (a.tokens.norm(dim=-1) + b.tokens.norm(dim=-1)) / 2)
    assert torch.equal(mix([a, b, _emb(3)], [0, 1, 0]).tokens, b.tokens)
    torch.testing.assert_close(mix([a, b], [1, 3]).tokens, interpolate(a, b, 0.75).tokens)


def test_incompatible_embeddings_are_refused():
    with pytest.raises(IncompatibleError, match="different embedders"):
        interpolate(_emb(1), _emb(2, embedder="pairdiff:clip:x"), 0.5)
    with pytest.raises(IncompatibleError, match="different embedders"):
        mix([_emb(1), _emb(2, shape=(4, 8))], [1, 1])
    with pytest.raises(IncompatibleError, match="use 'lerp' or 'slerp'"):
        interpolate(_emb(1), _emb(2), 0.5, "cubic")


def _users(n_users: int, seed: int = 0):
    out = []
    for u in range(n_users):
        a = [random_image(seed * 1000 + 10 * u + i) for i in range(4)]
        b = [random_image(seed * 1000 + 10 * u + i + 4) for i in range(4)]
        out.append(pairs_from_images([f"caption {u}"], a, b, user_id=f"user{u}"))
    return out


def test_vlm_direct_embeddings(tiny_llava_dir):
    embedder = VLMEmbedder(tiny_llava_dir, mode="direct", layers="all")
    users = _users(3)
    one = [embedder.embed([u])[0] for u in users]
    assert one[0].tokens.shape == (3, 32)  # embedding output + 2 layers, hidden 32
    assert one[0].embedder == f"vlm:{tiny_llava_dir.name}:direct:all"
    again = embedder.embed(users[:1])[0]
    assert torch.equal(again.tokens, one[0].tokens)  # deterministic
    assert (one[0].tokens - one[1].tokens).abs().max() > 1e-4  # other pairs, other user
    batched = VLMEmbedder(tiny_llava_dir, mode="direct", batch_size=3).embed(users)
    for a, b in zip(one, batched):
        torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-4, atol=1e-5)
    last = VLMEmbedder(tiny_llava_dir, mode="direct", layers="-1").embed(users[:1])[0]
    assert torch.equal(last.tokens[0], one[0].tokens[-1])
    assert one[0].meta["content_hash"] and one[0].meta["n_pairs"] == 4


def test_vlm_chain_of_thought_returns_profile(tiny_llava_dir):
    embedder = VLMEmbedder(tiny_llava_dir, mode="cot", max_new_tokens=6)
    users = _users(2, seed=1)
    one = [embedder.embed([u])[0] for u in users]
    assert isinstance(one[0].profile, str) and one[0].profile  # random weights: gibberish, but generated text
    assert one[0].tokens.shape == (3, 32) and one[0].embedder.endswith(":cot:all")
    batched = VLMEmbedder(tiny_llava_dir, mode="cot", max_new_tokens=6, batch_size=2).embed(users)
    for a, b in zip(one, batched):
        torch.testing.assert_close(a.tokens, b.tokens, rtol=1e-4, atol=1e-5)
        assert a.profile == b.profile


def test_prompt_keeps_each_image_next_to_its_caption(tiny_llava_dir):
    pairs = _users(1)[0]
    prompt = build_prompt(pairs, "<image>")
    assert prompt.count("<image>") == 8
    first = prompt.index("Pair 1.")
    assert first < prompt.index("<image>") < prompt.index("Pair 2.")
    embedder = VLMEmbedder(tiny_llava_dir)
    message = [{"role": "user", "content": [{"type": "text", "text": prompt}]}]
    rendered = embedder.processor.apply_chat_template(message, add_generation_prompt=True, tokenize=False)
    assert rendered.index("Pair 1.") < rendered.index("<image>")


def test_not_a_vlm_folder(tmp_path, tiny_stage_c_dir):
    with pytest.raises(PPDError, match="not a model folder"):
        VLMEmbedder(tmp_path)
    with pytest.raises(PPDError, match="not a LLaVA-OneVision VLM"):
        VLMEmbedder(tiny_stage_c_dir)
    with pytest.raises(PPDError, match="Unknown embedding mode"):
        VLMEmbedder(tmp_path, mode="fast")


def test_layer_errors(tiny_llava_dir):
    with pytest.raises(PPDError, match="hidden states 0..2"):
        VLMEmbedder(tiny_llava_dir, layers="5")


def test_pair_difference_with_clip_from_disk(tmp_path):
    from helpers import write_tiny_clip_vision

    from ppd_train.embedders.pairdiff import PairDifferenceEmbedder

    write_tiny_clip_vision(tmp_path / "clip")
    embedder = PairDifferenceEmbedder.from_clip(tmp_path / "clip")
    users = _users(2)
    embs = embedder.embed(users)
    assert embs[0].tokens.shape == (4, 16) and embs[0].embedder == "pairdiff:clip:clip"
    swapped = embedder.embed([[type(p)(p.prompt, p.rejected, p.chosen) for p in users[0]]])[0]
    torch.testing.assert_close(swapped.tokens, -embs[0].tokens)  # preference direction is what it encodes


def test_embed_job_resumes_after_interrupt(tmp_path, tiny_llava_dir):
    users = {}
    for u in range(5):
        for p in load_pair_folder(write_pair_folder(tmp_path / "data" / f"user{u}", n=5, seed=u)):
            users.setdefault(p.user_id, []).append(p)
    users["short"] = users["user0"][:2]  # too few pairs: skipped and reported
    embedder = VLMEmbedder(tiny_llava_dir, batch_size=2)
    full = tmp_path / "full.safetensors"
    embed_users(users, embedder, full, n_pairs=4, batch_users=2, show_progress=False)

    resumed = tmp_path / "resumed.safetensors"
    calls = []

    def interrupt(n):
        calls.append(n)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl+C after two batches were written

    with pytest.raises(KeyboardInterrupt):
        embed_users(users, embedder, resumed, n_pairs=4, batch_users=2, show_progress=False, progress=interrupt)
    assert not resumed.exists() and len(list((tmp_path / "resumed.safetensors.parts").glob("part-*"))) == 2
    seen = []
    embed_users(users, embedder, resumed, n_pairs=4, batch_users=2, show_progress=False, progress=seen.append)
    assert sum(seen) == 1  # only the one remaining user was embedded
    assert resumed.read_bytes() == full.read_bytes()
    table, info = load_embedding_table(resumed)
    assert sorted(table) == [f"user{u}" for u in range(5)] and info["skipped_users"] == ["short"]
    assert len(table["user0"].meta["pair_sources"]) == 4
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        embed_users(users, embedder, tmp_path / "x.safetensors", n_pairs=4, batch_users=2, show_progress=False,
                    progress=interrupt)
    with pytest.raises(PPDError, match="other settings.*delete"):
        embed_users(users, embedder, tmp_path / "x.safetensors", n_pairs=3, show_progress=False)


@pytest.mark.parametrize("w", [0.25, 0.6, 0.9])
def test_slerp_at_interior_weights_matches_the_closed_form(w):
    """Tokens at 90, 60 and 120 degrees (lengths 2 -> 4, 1 -> 3, 0.5 -> 0.8). Slerp walks the arc at angle w * omega
    from ``a`` with the length interpolated linearly."""
    a = UserEmbedding(torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.0, 0.0]]), "x")
    b = UserEmbedding(torch.tensor([[0.0, 4.0, 0.0], [1.5, 3 ** 0.5 * 1.5, 0.0], [-0.4, 3 ** 0.5 * 0.4, 0.0]]), "x")
    got = interpolate(a, b, w, "slerp").tokens
    cases = [(math.pi / 2, 2.0, 4.0), (math.pi / 3, 1.0, 3.0), (2 * math.pi / 3, 0.5, 0.8)]
    for token, (omega, na, nb) in enumerate(cases):
        angle, length = w * omega, (1 - w) * na + w * nb
        torch.testing.assert_close(got[token], torch.tensor([math.cos(angle), math.sin(angle), 0.0]) * length)
    torch.testing.assert_close(interpolate(a, b, w).tokens, (1 - w) * a.tokens + w * b.tokens)
    # (anti)parallel tokens have no plane to turn in: the direction falls back to the straight line
    c = UserEmbedding(torch.tensor([[3.0, 0.0, 0.0], [0.0, 2.0, 0.0]]), "x")
    d = UserEmbedding(torch.tensor([[1.0, 0.0, 0.0], [0.0, -4.0, 0.0]]), "x")
    par = interpolate(c, d, w, "slerp").tokens
    torch.testing.assert_close(par[0], torch.tensor([3.0 - 2.0 * w, 0.0, 0.0]))
    torch.testing.assert_close(par[1], torch.tensor([0.0, 1.0 - 2.0 * w, 0.0]) * (2.0 + 2.0 * w))


def test_mixes_record_who_is_in_them_and_refuse_bad_weights():
    a, b, c = _emb(1), _emb(2), _emb(3)
    assert a.describe() == "user embedding of u1 (3 x 8, embedder 'vlm:x:direct:all')" and a.profile == ""
    assert UserEmbedding(a.tokens, "e").describe() == "user embedding (3 x 8, embedder 'e')"
    mid = interpolate(a, b, 0.25, "slerp")
    assert mid.meta == {"mix": [{"user": "u1", "weight": 0.75}, {"user": "u2", "weight": 0.25}],
                        "mix_method": "slerp"} and mid.embedder == a.embedder
    anonymous = interpolate(UserEmbedding(a.tokens, a.embedder), UserEmbedding(b.tokens, b.embedder), 0.5)
    assert [m["user"] for m in anonymous.meta["mix"]] == ["a", "b"]
    three = mix([a, b, c], [1, 1, 2])
    torch.testing.assert_close(three.tokens, (a.tokens + b.tokens + 2 * c.tokens) / 4)
    assert three.meta == {"mix": [{"user": "u1", "weight": 0.25}, {"user": "u2", "weight": 0.25},
                                  {"user": "u3", "weight": 0.5}], "mix_method": "lerp"}
    assert [m["user"] for m in mix([UserEmbedding(a.tokens, a.embedder), b], [1, 1]).meta["mix"]] == ["0", "u2"]
    for weights, msg in (([1], "one weight per embedding"), ([0, 0], "all zero"), ([1, -1], "must be >= 0")):
        with pytest.raises(PPDError, match=msg):
            mix([a, b], weights)
    with pytest.raises(IncompatibleError, match="one weight per embedding"):
        mix([], [])
    with pytest.raises(IncompatibleError, match=r"\[tokens, width\]; got shape \(8,\)"):
        UserEmbedding(torch.zeros(8), "x")


def test_embedding_tables_round_trip_and_refuse_damage(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from ppd_train.embedding import save_embedding_table

    users = {"zed": _emb(1), "amy": _emb(2)}
    path = tmp_path / "t.safetensors"
    save_embedding_table(path, users, {"source": "test"})
    table, info = load_embedding_table(path)
    assert list(table) == ["amy", "zed"] and info == {"source": "test"}  # users sorted: a stable file
    assert torch.equal(table["zed"].tokens, users["zed"].tokens) and table["zed"].meta == {"user_id": "u1"}
    assert table["amy"].embedder == "vlm:x:direct:all"
    save_embedding_table(tmp_path / "again.safetensors", dict(reversed(list(users.items()))), {"source": "test"})
    assert (tmp_path / "again.safetensors").read_bytes() == path.read_bytes()  # same users, same bytes
    reordered = {"zed": UserEmbedding(users["zed"].tokens, "vlm:x:direct:all", {"b": 2, "user_id": "u1", "a": 1}),
                 "amy": UserEmbedding(users["amy"].tokens, "vlm:x:direct:all", {"a": 1, "user_id": "u2", "b": 2})}
    save_embedding_table(tmp_path / "r1.safetensors", reordered)
    reordered["zed"].meta = {"a": 1, "user_id": "u1", "b": 2}  # same content, other key order
    save_embedding_table(tmp_path / "r2.safetensors", reordered)
    assert (tmp_path / "r1.safetensors").read_bytes() == (tmp_path / "r2.safetensors").read_bytes()
    with pytest.raises(FileFormatError, match="embedding table file not found"):
        load_embedding_table(tmp_path / "missing.safetensors")
    _emb(1).save(tmp_path / "one.safetensors")
    with pytest.raises(FileFormatError, match=r"not a embedding table \(made by `ppd-train embed`\)"):
        load_embedding_table(tmp_path / "one.safetensors")
    save_embedding_table(tmp_path / "bare.safetensors", users)
    assert load_embedding_table(tmp_path / "bare.safetensors")[1] == {}
    with pytest.raises(IncompatibleError, match="No embeddings to save"):
        save_embedding_table(tmp_path / "none.safetensors", {})
    with pytest.raises(IncompatibleError, match="different embedders"):
        save_embedding_table(tmp_path / "mixed.safetensors", {"a": _emb(1), "b": _emb(2, embedder="other")})
    with safe_open(str(path), "pt") as f:
        metadata, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    del tensors["user/zed"]
    save_file(tensors, tmp_path / "damaged.safetensors", metadata=metadata)
    with pytest.raises(IncompatibleError, match="user zed is listed but has no tokens"):
        load_embedding_table(tmp_path / "damaged.safetensors")


def test_slerp_survives_rounding_past_plus_or_minus_one():
    """Normalised (anti)parallel tokens can have a dot product of 1.0000002 or -1.0000001 in float32; the clamp keeps
    arccos finite and the straight-line fallback takes over."""
    a = torch.randn(1, 8, generator=torch.Generator().manual_seed(0))
    for scale in (3.0, -0.7):  # dot products just above 1 and just below -1 for this draw
        for w in (0.25, 0.75):
            got = interpolate(UserEmbedding(a, "x"), UserEmbedding(a * scale, "x"), w, "slerp").tokens
            unit = a / a.norm()
            expected = unit * (1 - w + w * (1 if scale > 0 else -1)) * a.norm() * (1 - w + w * abs(scale))
            torch.testing.assert_close(got, expected)


def test_user_embedding_files_are_checked(tmp_path):
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    path = tmp_path / "u.safetensors"
    _emb(1).save(path)
    with safe_open(str(path), "pt") as f:
        metadata, tokens = f.metadata(), f.get_tensor("tokens")
    assert metadata["format"] == "ppd-user-embedding"  # the file says what it is, for any safetensors reader
    meta = json.loads(metadata["ppd_user_embedding"])
    for change, tensors in (({"format": "other"}, {"tokens": tokens}), ({}, {"weights": tokens}),
                            ({"format": None}, {"tokens": tokens})):
        broken = {k: v for k, v in {**meta, **change}.items() if v is not None}
        save_file(tensors, tmp_path / "b.safetensors", metadata={"ppd_user_embedding": json.dumps(broken)})
        with pytest.raises(PPDError, match="b.safetensors is not a PPD user embedding"):
            UserEmbedding.load(tmp_path / "b.safetensors")
    no_version = {k: v for k, v in meta.items() if k != "format_version"}
    save_file({"tokens": tokens}, tmp_path / "b.safetensors", metadata={"ppd_user_embedding": json.dumps(no_version)})
    with pytest.raises(FileFormatError, match="format_version is None, not a whole number >= 1: the file is damaged"):
        UserEmbedding.load(tmp_path / "b.safetensors")
    save_file({"tokens": torch.full((2, 3), float("nan"))}, tmp_path / "b.safetensors",
              metadata={"ppd_user_embedding": json.dumps(meta)})
    with pytest.raises(IncompatibleError, match="b.safetensors: User embedding from 'vlm:x:direct:all' contains NaN"):
        UserEmbedding.load(tmp_path / "b.safetensors")
    with pytest.raises(FileFormatError, match="user embedding file not found"):
        UserEmbedding.load(tmp_path / "missing.safetensors")


def test_tokens_are_kept_as_float32():
    e = UserEmbedding(torch.randn(3, 8, dtype=torch.float64), "x")
    assert e.tokens.dtype == torch.float32 and e.tokens.is_contiguous()


def test_weights_out_of_range_are_refused_by_name():
    """interpolate takes weights in [0, 1] only, mix any share >= 0; each refusal names the weight and the fix."""
    a, b = _emb(1), _emb(2)
    for w in (-0.25, 1.5):
        with pytest.raises(PPDError, match=rf"^Interpolation weight must be between 0 and 1, got {w}\. "
                                           r"Use 0 \(user A\) to 1 \(user B\)\.$"):
            interpolate(a, b, w)
    with pytest.raises(PPDError, match=r"^Mix weight 2 must be >= 0, got -1\. Give each user a share >= 0\.$"):
        mix([a, b], [1, -1])
    # huge shares are scaled down before they are summed: no overflow to inf/NaN
    torch.testing.assert_close(mix([a, b], [1e300, 3e300]).tokens, interpolate(a, b, 0.75).tokens)


def test_load_embeddings_keys_one_users_file_by_its_user_or_its_file_name(tmp_path):
    """One user's file: keyed by the user id it records, else by the file's name without ``.safetensors``; a file that
    is not safetensors is named in the refusal as what it should have been."""
    from ppd_train.embedding import load_embeddings

    tokens = torch.randn(3, 4, generator=torch.Generator().manual_seed(0))
    UserEmbedding(tokens, "test", {"user_id": "ann"}).save(tmp_path / "picks.safetensors")
    UserEmbedding(tokens, "test", {}).save(tmp_path / "bob.safetensors")
    assert list(load_embeddings(tmp_path / "picks.safetensors")) == ["ann"]
    (key, emb), = load_embeddings(tmp_path / "bob.safetensors").items()
    assert key == "bob" and torch.equal(emb.tokens, tokens)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(FileFormatError, match=r"\bnot a readable .*\buser embedding or embedding table\b"):
        load_embeddings(tmp_path / "junk.safetensors")


# ------------------------------------------------------------------------------------------- VLM load options
def test_vlm_half_precision_moves_user_tokens_little(tiny_llava_dir):
    """dtype reaches the weights, and a half-precision VLM gives nearly the fp32 user tokens (docs/performance.md
    reports the real-size figures)."""
    users = _users(1)
    ref = VLMEmbedder(tiny_llava_dir, mode="direct").embed(users)[0].tokens
    for dtype in (torch.bfloat16, torch.float16):
        embedder = VLMEmbedder(tiny_llava_dir, mode="direct", dtype=dtype)
        assert next(embedder.model.parameters()).dtype == dtype
        emb = embedder.embed(users)[0]
        tokens = emb.tokens
        assert emb.meta["dtype"] == str(dtype).removeprefix("torch.") and emb.meta["quantize"] == "none"
        assert tokens.dtype == torch.float32 and not torch.equal(tokens, ref)
        assert (tokens - ref).norm() / ref.norm() < 0.05


def test_vlm_quantize_and_offload_refused_off_cuda(tiny_llava_dir):
    with pytest.raises(PPDError, match=r"quantize=8bit needs a CUDA GPU.*this run's device is cpu"):
        VLMEmbedder(tiny_llava_dir, quantize="8bit")
    with pytest.raises(PPDError, match=r"option offload needs a CUDA GPU"):
        VLMEmbedder(tiny_llava_dir, offload=True)
    with pytest.raises(PPDError, match=r"Unknown VLM quantize option '3bit'"):
        VLMEmbedder(tiny_llava_dir, quantize="3bit")


def test_vlm_quantize_without_bitsandbytes_says_how_to_install():
    import importlib.util

    from ppd_train.embedders.vlm import vlm_load_kwargs

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed here")
    # building the arguments touches no GPU: the refusal is what a CUDA user without bitsandbytes sees
    with pytest.raises(PPDError, match=r"quantize=4bit needs the bitsandbytes package: `pip install bitsandbytes`"):
        vlm_load_kwargs("cuda:0", torch.bfloat16, "4bit")


def test_vlm_offload_builds_an_accelerate_device_map():
    from ppd_train.embedders.vlm import vlm_load_kwargs

    kw = vlm_load_kwargs("cuda:1", torch.bfloat16, offload=True, max_gpu_gib=6)
    assert kw["device_map"] == "auto" and kw["dtype"] == torch.bfloat16
    assert kw["max_memory"][1] == 6 * 2**30 and kw["max_memory"]["cpu"] > 0 and list(kw["max_memory"]) == [1, "cpu"]
    assert vlm_load_kwargs("cpu", torch.float32) == {"dtype": torch.float32}  # plain: the caller moves it


def test_vlm_gpu_bytes_counts_parameters_per_option(tiny_llava_dir):
    from ppd_train.embedders.vlm import vlm_gpu_bytes

    n = sum(p.numel() for p in VLMEmbedder(tiny_llava_dir).model.parameters())
    assert vlm_gpu_bytes(tiny_llava_dir, torch.float32) == 4 * n
    assert vlm_gpu_bytes(tiny_llava_dir, torch.bfloat16) == 2 * n
    assert vlm_gpu_bytes(tiny_llava_dir, torch.bfloat16, "4bit") == n // 2
    assert vlm_gpu_bytes(tiny_llava_dir, torch.float32, offload=True, max_gpu_gib=1e-6) == int(1e-6 * 2**30)


def test_vlm_unload_frees_the_model(tiny_llava_dir):
    """After a job nothing holds the VLM (the node relies on this so the VLM and Stage C never share the GPU)."""
    import weakref

    embedder = VLMEmbedder(tiny_llava_dir, mode="cot", max_new_tokens=3)
    embedder.embed(_users(1))
    ref = weakref.ref(embedder.model)
    embedder.unload()
    assert ref() is None


def test_cli_embed_load_options(tiny_llava_dir, tmp_path, capsys):
    from ppd_train.cli import main

    folder = write_pair_folder(tmp_path / "anna", n=4)
    out = tmp_path / "users.safetensors"
    base = ["embed", "--pairs", str(folder), "--out", str(out), "--quiet", "--device", "cpu"]
    assert main([*base, "--vlm", str(tiny_llava_dir), "--quantize", "4bit"]) == 2
    assert "quantize=4bit needs a CUDA GPU" in capsys.readouterr().err and not out.exists()
    assert main([*base, "--clip", str(tmp_path), "--offload"]) == 2
    assert "the pair-difference embedder (--clip) takes neither" in capsys.readouterr().err
    assert main([*base, "--vlm", str(tiny_llava_dir), "--dtype", "bfloat16"]) == 0
    (emb,) = load_embedding_table(out)[0].values()
    assert emb.tokens.dtype == torch.float32 and torch.isfinite(emb.tokens).all()
