"""Node logic through plain calls into the nodes, with tiny real models and real files (no ComfyUI needed).

The Stage C patch and the ComfyUI-facing wrappers run against a real ComfyUI in tests/comfyui/.
"""

from __future__ import annotations

import importlib
import json
import os
from pathlib import Path

import pytest
import torch
from helpers import jpeg_bytes, write_pair_folder, write_pickapic

API = json.loads((Path(__file__).parent / "node_api.json").read_text())


def mod(pack, name: str):
    return importlib.import_module(f"{pack.__name__}.{name}")


def test_every_node_is_pinned_and_documented(pack):
    nodes = mod(pack, "nodes")
    assert sorted(nodes.NODE_CLASS_MAPPINGS) == sorted(API), "node ids are part of saved workflows: never rename"
    for node_id, cls in nodes.NODE_CLASS_MAPPINGS.items():
        assert cls.CATEGORY.startswith("PPD") and cls.DESCRIPTION and hasattr(cls, cls.FUNCTION)
        assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES), node_id
        assert list(cls.RETURN_TYPES) == API[node_id]["outputs"], node_id
        assert nodes.NODE_DISPLAY_NAME_MAPPINGS[node_id]


@pytest.mark.parametrize("node_id", ["PPDPreferencePairsFromImages", "PPDVLMUserEmbedder", "PPDEmbeddingInterpolate",
                                     "PPDEmbeddingMix", "PPDSaveUserEmbedding", "PPDApplyAdapter",
                                     "PPDTuneUserEmbedding"])
def test_widget_order_is_pinned(pack, node_id):
    """Widgets are positional in saved workflows: inputs may only be appended (the others are checked against a
    running ComfyUI, whose folder lists they need)."""
    spec = mod(pack, "nodes").NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
    names = [*spec["required"], *spec.get("optional", {})]
    assert names == API[node_id]["inputs"]
    for section in spec.values():
        for name, (_, *opts) in section.items():
            assert opts and opts[0].get("tooltip"), f"{node_id}.{name} has no tooltip"


# -------------------------------------------------------------------------------------------------------- folders
def test_paths_from_workflows_stay_inside_their_folder(pack, tmp_path):
    folders = mod(pack, "nodes.folders")
    errors = mod(pack, "ppd_train.errors")
    assert folders.inside(tmp_path, "a/b.safetensors") == tmp_path / "a" / "b.safetensors"
    for bad in ("../secret.safetensors", "a/../../x", "/etc/passwd", ""):
        with pytest.raises(errors.PPDError, match="outside|empty"):
            folders.inside(tmp_path, bad)
    with pytest.raises(errors.PPDError, match=r"not found\. Looked in: .*Refresh"):
        folders.find("ppd_adapters", "missing.safetensors", "PPD adapter", [tmp_path])


def test_pair_sources_are_listed_and_fingerprinted(pack, tmp_path):
    folders = mod(pack, "nodes.folders")
    write_pair_folder(tmp_path / "anna")
    write_pair_folder(tmp_path / "artists" / "ben", fmt="csv")
    write_pickapic(tmp_path / "shard.parquet", [dict(caption="c", jpg_0=jpeg_bytes(0), jpg_1=jpeg_bytes(1),
                                                     label_0=1.0, label_1=0.0, user_id=5)])
    (tmp_path / "not_pairs").mkdir()
    assert folders.list_pair_sources([tmp_path]) == ["anna", "artists/ben", "shard.parquet"]
    before = folders.fingerprint(tmp_path / "anna")
    assert folders.fingerprint(tmp_path / "anna") == before
    (tmp_path / "anna" / "pairs.jsonl").write_text((tmp_path / "anna" / "pairs.jsonl").read_text() + "\n")
    assert folders.fingerprint(tmp_path / "anna") != before


# ---------------------------------------------------------------------------------------------------------- pairs
def test_pair_loader_folder_and_pickapic(pack, tmp_path):
    pair_nodes = mod(pack, "nodes.pair_nodes")
    PairError = mod(pack, "ppd_train.pairs").PairError
    folder = write_pair_folder(tmp_path / "anna", n=6)
    pairs, summary = pair_nodes.load_pair_source(folder, "", 4, "first", 0)
    assert [p.source for p in pairs] == [f"anna/pairs.jsonl line {i}" for i in range(1, 5)]
    assert summary.startswith("4 of 6 pairs of anna (first)")
    rand, _ = pair_nodes.load_pair_source(folder, "", 4, "random", 3)
    assert rand == pair_nodes.load_pair_source(folder, "", 4, "random", 3)[0] and len(rand) == 4
    with pytest.raises(PairError, match="6 usable preference pair.*7 were asked"):
        pair_nodes.load_pair_source(folder, "", 7, "first", 0)
    with pytest.raises(PairError, match="no pairs of user 'zoe'"):
        pair_nodes.load_pair_source(folder, "zoe", 4, "first", 0)

    rows = [dict(caption=f"c{i}", jpg_0=jpeg_bytes(i), jpg_1=jpeg_bytes(50 + i), label_0=1.0, label_1=0.0,
                 user_id=7 + i % 2) for i in range(8)]
    shard = write_pickapic(tmp_path / "shard.parquet", rows)
    with pytest.raises(PairError, match="holds the pairs of 2 users; enter one in 'user_id'"):
        pair_nodes.load_pair_source(shard, "", 4, "first", 0)
    pairs, summary = pair_nodes.load_pair_source(shard, " 7 ", 4, "first", 0)
    assert {p.user_id for p in pairs} == {"7"} and "user 7" in summary


def test_pairs_from_images(pack):
    node = mod(pack, "nodes.pair_nodes").PPDPreferencePairsFromImages()
    PairError = mod(pack, "ppd_train.pairs").PairError
    a, b = torch.rand(3, 16, 20, 3), torch.rand(3, 16, 20, 3)
    (pairs,) = node.build(a, b, "a cat\n\n", "ABA")
    assert [p.prompt for p in pairs] == ["a cat"] * 3
    first_a = pairs[0].chosen.load()
    assert first_a.size == (20, 16) and first_a.getpixel((0, 0)) == tuple(round(float(v) * 255) for v in a[0, 0, 0])
    assert pairs[1].chosen.where.endswith("(B)") and pairs[0].chosen.where.endswith("(A)")
    with pytest.raises(PairError, match="3 letters for 2 pairs|one letter per pair"):
        node.build(a[:2], b[:2], "x", "ABA")
    with pytest.raises(PairError, match="letters A or B"):
        node.build(a, b, "x", "AXA")
    with pytest.raises(PairError, match="one B image per A image"):
        node.build(a, b[:2], "x", "A")


# ------------------------------------------------------------------------------------------------------ embedding
def test_vlm_embedder_runs_once_per_content(pack, tiny_llava_dir, tmp_path):
    embedder_nodes = mod(pack, "nodes.embedder_nodes")
    pair_nodes = mod(pack, "nodes.pair_nodes")
    folder = write_pair_folder(tmp_path / "anna", n=4)
    pairs, _ = pair_nodes.load_pair_source(folder, "", 4, "first", 0)
    vlm = embedder_nodes.VLMHandle(Path(tiny_llava_dir), "fp32")
    loads: list[int] = []
    emb = embedder_nodes.embed_pairs(vlm, pairs, "direct", "all", 64, torch.device("cpu"), before_load=loads.append)
    assert loads and loads[0] > 0 and emb.embedder == f"vlm:{Path(tiny_llava_dir).name}:direct:all"
    assert emb.meta["n_pairs"] == 4 and torch.isfinite(emb.tokens).all()
    # the same content again (even re-read from disk): served from the cache, the VLM is not loaded again
    again_pairs, _ = pair_nodes.load_pair_source(folder, "", 4, "first", 0)
    assert embedder_nodes.embed_pairs(vlm, again_pairs, "direct", "all", 64, torch.device("cpu"),
                                      before_load=loads.append) is emb and len(loads) == 1
    # other pairs give another user
    other, _ = pair_nodes.load_pair_source(write_pair_folder(tmp_path / "ben", n=4, seed=9), "", 4, "first", 0)
    emb_b = embedder_nodes.embed_pairs(vlm, other, "direct", "all", 64, torch.device("cpu"))
    assert not torch.equal(emb.tokens, emb_b.tokens)
    # chain-of-thought: a per-token hook that can abort (how the node shows progress and honours Cancel)
    ticks: list[int] = []
    cot = embedder_nodes.embed_pairs(vlm, pairs, "chain-of-thought", "last", 5, torch.device("cpu"),
                                     on_token=lambda: ticks.append(1))
    assert cot.embedder.split(":")[2] == "cot"
    assert 1 <= len(ticks) <= 5 and cot.tokens.shape[0] == 1

    class Cancelled(Exception):
        pass

    def cancel() -> None:
        raise Cancelled

    with pytest.raises(Cancelled):
        embedder_nodes.embed_pairs(vlm, other, "chain-of-thought", "last", 5, torch.device("cpu"), on_token=cancel)


def test_vlm_load_options_reach_the_embedder(pack, tiny_llava_dir, tmp_path):
    embedder_nodes = mod(pack, "nodes.embedder_nodes")
    pair_nodes = mod(pack, "nodes.pair_nodes")
    PPDError = mod(pack, "ppd_train.errors").PPDError
    # pairs of their own: the embedding cache is shared by the whole process
    pairs, _ = pair_nodes.load_pair_source(write_pair_folder(tmp_path / "cleo", n=4, seed=31), "", 4, "first", 0)
    loads: list[int] = []
    quantized = embedder_nodes.VLMHandle(Path(tiny_llava_dir), "fp32", quantize="8bit")
    with pytest.raises(PPDError, match="quantize=8bit needs a CUDA GPU"):
        embedder_nodes.embed_pairs(quantized, pairs, "direct", "all", 16, torch.device("cpu"), before_load=loads.append)
    assert loads == []  # refused before ComfyUI is asked to free anything
    fp32 = embedder_nodes.embed_pairs(embedder_nodes.VLMHandle(Path(tiny_llava_dir), "fp32"), pairs, "direct", "all",
                                      16, torch.device("cpu"), before_load=loads.append)
    bf16 = embedder_nodes.embed_pairs(embedder_nodes.VLMHandle(Path(tiny_llava_dir), "bf16"), pairs, "direct", "all",
                                      16, torch.device("cpu"), before_load=loads.append)
    assert loads[1] * 2 == loads[0]  # the memory asked for follows the dtype
    assert not torch.equal(fp32.tokens, bf16.tokens)  # another cache entry, really made in bf16


def test_vlm_handle_refuses_wrong_folders(pack, tmp_path):
    embedder_nodes = mod(pack, "nodes.embedder_nodes")
    PPDError = mod(pack, "ppd_train.errors").PPDError
    with pytest.raises(PPDError, match=r"is not a model folder \(no config.json\)"):
        embedder_nodes.VLMHandle(tmp_path).check()
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PPDError, match="holds a 'llama' model, not a LLaVA-OneVision VLM"):
        embedder_nodes.VLMHandle(tmp_path).check()


def _embedding(pack, seed: int, embedder: str = "test", shape=(5, 24)):
    UserEmbedding = mod(pack, "ppd_train.embedding").UserEmbedding
    return UserEmbedding(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), embedder,
                         {"user_id": f"u{seed}", "profile": f"likes {seed}"})


def test_interpolate_and_mix_nodes(pack):
    nodes = mod(pack, "nodes.embedding_nodes")
    IncompatibleError = mod(pack, "ppd_train.errors").IncompatibleError
    a, b, c = (_embedding(pack, s) for s in (1, 2, 3))
    (mid,) = nodes.PPDEmbeddingInterpolate().run(a, b, 0.5, "lerp")
    assert torch.allclose(mid.tokens, (a.tokens + b.tokens) / 2)
    assert torch.equal(nodes.PPDEmbeddingInterpolate().run(a, b, 0.0, "slerp")[0].tokens, a.tokens)
    (mixed,) = nodes.PPDEmbeddingMix().run(a, 1.0, b, 1.0, 1.0, 2.0, embedding_3=None, embedding_4=c)
    assert torch.allclose(mixed.tokens, (a.tokens + b.tokens + 2 * c.tokens) / 4, atol=1e-6)
    with pytest.raises(IncompatibleError, match="different embedders"):
        nodes.PPDEmbeddingInterpolate().run(a, _embedding(pack, 4, "vlm:other:direct:all"), 0.5, "lerp")


def test_save_and_load_user_embedding(pack, tmp_path):
    nodes = mod(pack, "nodes.embedding_nodes")
    UserEmbedding = mod(pack, "ppd_train.embedding").UserEmbedding
    PPDError = mod(pack, "ppd_train.errors").PPDError
    emb = _embedding(pack, 1)
    first = nodes.save_embedding(emb, tmp_path, "artists/anna", note="from 4 beach pairs")
    second = nodes.save_embedding(emb, tmp_path, "artists/anna")
    assert first.relative_to(tmp_path).as_posix() == "artists/anna_00001.safetensors"
    assert second.name == "anna_00002.safetensors"  # never overwrites
    loaded = UserEmbedding.load(first)
    assert torch.equal(loaded.tokens, emb.tokens) and loaded.meta["note"] == "from 4 beach pairs"
    assert loaded.profile == "likes 1" and loaded.embedder == "test"
    assert nodes.next_free_path(tmp_path, "/lead").parent == tmp_path  # a leading '/' stays inside the folder
    for bad in ("../outside", "a/../../b", "", "x\\..\\y", "a//b"):
        with pytest.raises(PPDError, match="not allowed|outside"):
            nodes.next_free_path(tmp_path, bad)
    assert not list(tmp_path.parent.glob("outside*"))


def test_adapter_file_loads_for_the_nodes(pack, tmp_path, tiny_unet):
    adapter_mod = mod(pack, "ppd_train.adapter")
    stage_c = mod(pack, "ppd_train.stage_c")
    config = adapter_mod.AdapterConfig.for_model(stage_c.stage_c_info(tiny_unet), embed_dim=24, num_tokens=5,
                                                   embedder="test")
    adapter_mod.save_adapter(adapter_mod.PPDAdapter(config), tmp_path / "a.safetensors")
    named = mod(pack, "nodes.adapter_nodes").load_named_adapter(tmp_path / "a.safetensors", "a.safetensors")
    assert named.name == "a.safetensors" and named.adapter.config == config
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{}")
    with pytest.raises(Exception, match="broken.safetensors"):
        mod(pack, "nodes.adapter_nodes").load_named_adapter(tmp_path / "broken.safetensors", "broken")


def test_pack_imports_without_comfyui():
    """Outside ComfyUI the pack imports cleanly and registers nothing (ComfyUI's modules are not on the path)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    code = ("import importlib.util, sys; spec = importlib.util.spec_from_file_location('p', sys.argv[1]); "
            "m = importlib.util.module_from_spec(spec); sys.modules['p'] = m; spec.loader.exec_module(m); "
            "print(len(m.NODE_CLASS_MAPPINGS))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code, str(root / "__init__.py")], capture_output=True, text=True,
                         env=env, cwd=root.parent, check=True)
    assert out.stdout.strip() == "0"
