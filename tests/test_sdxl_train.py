"""Training on SDXL: prepare with SDXL's own encoders, the DDPM schedule, fit (held-out users, selection, resume,
8-bit state, bf16 frozen base) and tune-user, all on a tiny real SDXL pipeline folder."""

from __future__ import annotations

import pytest
import torch
from helpers import write_pair_folder

from ppd_train.adapter import load_adapter, read_adapter_config
from ppd_train.cli import main
from ppd_train.dpo_data import DPOData
from ppd_train.embedding import UserEmbedding, save_embedding_table
from ppd_train.errors import PPDError
from ppd_train.pair_step import pair_inputs
from ppd_train.pairs import load_users
from ppd_train.prepare import prepare_dpo_data
from ppd_train.schedule import sdxl_add_noise, sdxl_timesteps

USERS = 4


@pytest.fixture(scope="module")
def sdxl_files(tmp_path_factory, tiny_sdxl_dir):
    """Pair folders of 4 users, their SDXL DPO data (16-pixel images: 8x8 latents) and an embedding table."""
    root = tmp_path_factory.mktemp("sdxl_files")
    folders = [str(write_pair_folder(root / "pairs" / f"user{u}", n=4, seed=u)) for u in range(USERS)]
    data = prepare_dpo_data(load_users(folders), None, None, root / "data.safetensors", image_size=16,
                            show_progress=False, sdxl=tiny_sdxl_dir)
    g = torch.Generator().manual_seed(0)
    save_embedding_table(root / "users.safetensors", {u: UserEmbedding(torch.randn(3, 8, generator=g), "test")
                                                     for u in data.user_ids})
    return root, folders, data


def test_sdxl_schedule_is_the_ddpm_scheduler_in_the_model_folder(tiny_sdxl_dir):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_pretrained(tiny_sdxl_dir / "scheduler", local_files_only=True)
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.num_train_timesteps == 1000
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 4, 8, 8, generator=g), torch.randn(6, 4, 8, 8, generator=g)
    t = torch.tensor([0.0, 0.0004, 0.25, 0.5, 0.9995, 1.0])
    steps = sdxl_timesteps(t)
    assert steps.tolist() == [0, 0, 250, 500, 999, 999]
    torch.testing.assert_close(sdxl_add_noise(x0, noise, t), scheduler.add_noise(x0, noise, steps))


def test_prepare_encodes_pairs_as_sdxls_pipeline_does(sdxl_files, tiny_sdxl_dir, tmp_path, capsys):
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline
    from PIL import Image

    from ppd_train.prepare import sdxl_preprocess

    root, folders, data = sdxl_files
    assert data.base == "sdxl" and data.user_ids == [f"user{u}" for u in range(USERS)] and len(data) == 16
    assert data.latents_w.shape == (16, 4, 8, 8) and data.text.shape[1:] == (77, 48)
    assert data.pooled.shape[1:] == (1, 32)
    # images are 40 wide, 48 high: shorter side to 16 -> 16 x 19, centre crop from the top 1
    assert data.time_ids.tolist() == [[48.0, 40.0, 1.0, 0.0, 16.0, 16.0]] * 16
    # text: what diffusers' own SDXL pipeline conditions on
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir, local_files_only=True)
    users = load_users(folders)
    first = users["user0"][0]
    cap = int(data.caption_idx[0])
    embeds, _, pooled, _ = pipe.encode_prompt(first.prompt, device="cpu", do_classifier_free_guidance=False)
    torch.testing.assert_close(data.text[cap], embeds[0])
    torch.testing.assert_close(data.pooled[cap, 0], pooled[0])
    # latents: the VAE's mean times its scaling factor; the dispreferred image at the preferred one's size first
    vae = AutoencoderKL.from_pretrained(tiny_sdxl_dir / "vae", local_files_only=True)
    chosen, rejected = first.chosen.load().convert("RGB"), first.rejected.load().convert("RGB")
    rejected = rejected.resize(chosen.size, Image.Resampling.BICUBIC)
    with torch.no_grad():
        x = torch.stack([sdxl_preprocess(chosen, 16)[0], sdxl_preprocess(rejected, 16)[0]])
        want = vae.encode(x).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(data.latents_w[0], want[0])
    torch.testing.assert_close(data.latents_l[0], want[1])
    # the file records its base and round-trips; the same command again reuses it
    loaded = DPOData.load(root / "data.safetensors")
    assert loaded.base == "sdxl" and torch.equal(loaded.time_ids, data.time_ids) and loaded.digest() == data.digest()
    args = ["prepare", "--pairs", *folders, "--sdxl", str(tiny_sdxl_dir), "--out", str(root / "data.safetensors"),
            "--image-size", "16", "--quiet", "--device", "cpu"]
    assert main(args) == 0 and "up to date" in capsys.readouterr().out
    assert main([*args, "--effnet", "x.safetensors"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["prepare", "--pairs", *folders, "--sdxl", str(tmp_path), "--out", str(tmp_path / "d.safetensors"),
                 "--quiet"]) == 2
    assert "is not an SDXL diffusers folder (no vae, text_encoder" in capsys.readouterr().err


def test_sdxl_pair_inputs_and_a_fresh_adapters_loss(sdxl_files, tiny_sdxl):
    """Both images of a pair share noise and timestep; with a fresh adapter policy == reference: loss ln 2."""
    from ppd_train.adapter import AdapterConfig, PPDAdapter
    from ppd_train.binding import PPDBinding, model_info
    from ppd_train.pair_step import pair_loss

    _, _, data = sdxl_files
    idx, t = torch.tensor([0, 5, 9]), torch.tensor([0.1, 0.5, 0.95])
    eps = torch.randn(3, 4, 8, 8)
    inputs = pair_inputs(tiny_sdxl)(data, idx, t, eps, "cpu")
    assert inputs["timestep"].tolist() == [100, 500, 950] * 2
    torch.testing.assert_close(inputs["sample"][:3], sdxl_add_noise(data.latents_w[idx], eps, t))
    torch.testing.assert_close(inputs["sample"][3:], sdxl_add_noise(data.latents_l[idx], eps, t))
    assert torch.equal(inputs["added_cond_kwargs"]["time_ids"][3:], data.time_ids[idx])
    assert torch.equal(inputs["encoder_hidden_states"][3:], data.text[data.caption_idx[idx]])
    adapter = PPDAdapter(AdapterConfig.for_model(model_info(tiny_sdxl), embed_dim=8, num_tokens=3))
    binding = PPDBinding(tiny_sdxl, adapter)
    stats = pair_loss(binding, inputs, eps, lambda: adapter(torch.randn(6, 3, 8)), beta=100.0, weights=1.0)
    assert abs(float(stats.loss.detach()) - 0.6931471805599453) < 1e-6


def _fit(root, tiny_sdxl_dir, out, *extra: str) -> int:
    return main(["fit", "--set", f"sdxl={tiny_sdxl_dir}", "--set", f"data={root / 'data.safetensors'}",
                 "--set", f"embeddings={root / 'users.safetensors'}", "--set", f"out_dir={out}",
                 "--set", "batch_size=4", "--set", "lr=1e-2", "--set", "beta=100", "--set", "tensorboard=false",
                 "--set", "val_every=2", "--set", "select_after=0", *extra, "--quiet"])


def test_fit_on_sdxl_selects_resumes_exactly_and_writes_an_sdxl_adapter(sdxl_files, tiny_sdxl_dir, tmp_path):
    root, _, data = sdxl_files
    assert _fit(root, tiny_sdxl_dir, tmp_path / "straight", "--set", "max_steps=4") == 0
    adapter = load_adapter(tmp_path / "straight" / "adapter.safetensors")
    training = adapter.config.training
    assert adapter.config.base == "sdxl" and len(adapter.config.block_widths) == 11
    assert training["base_model"] == str(tiny_sdxl_dir) and len(training["heldout_users"]) == 1
    assert training["selected"]["metric"] == "val_users_implicit_acc"
    last = read_adapter_config(tmp_path / "straight" / "adapter_last.safetensors")[1]
    assert any(t.abs().sum() > 0 for k, t in last.items() if "to_v" in k)  # it learned
    # 2 steps, then resumed to 4: bit-identical to 4 in one go
    assert _fit(root, tiny_sdxl_dir, tmp_path / "resumed", "--set", "max_steps=2") == 0
    assert _fit(root, tiny_sdxl_dir, tmp_path / "resumed", "--set", "max_steps=4") == 0
    resumed = read_adapter_config(tmp_path / "resumed" / "adapter_last.safetensors")[1]
    assert all(torch.equal(last[k], resumed[k]) for k in last)


def test_fit_on_sdxl_in_bf16_with_8bit_state_and_checkpointing(sdxl_files, tiny_sdxl_dir, tmp_path, request):
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)  # one precision per process: a fresh state here
    request.addfinalizer(lambda: AcceleratorState._reset_state(reset_partial_state=True))
    root, _, _ = sdxl_files
    assert _fit(root, tiny_sdxl_dir, tmp_path / "bf16", "--set", "max_steps=2", "--set", "mixed_precision=bf16",
                "--set", "optimizer=adamw8bit", "--set", "gradient_checkpointing=true") == 0
    tensors = read_adapter_config(tmp_path / "bf16" / "adapter_last.safetensors")[1]
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert any(t.abs().sum() > 0 for k, t in tensors.items() if "to_v" in k)


def test_data_of_one_base_is_refused_on_the_other(sdxl_files, tiny_sdxl, tiny_stage_c_dir, capsys, tmp_path):
    root, _, data = sdxl_files
    argv = ["fit", "--set", f"stage_c={tiny_stage_c_dir}", "--set", f"data={root / 'data.safetensors'}",
            "--set", f"embeddings={root / 'users.safetensors'}", "--set", f"out_dir={tmp_path / 'r'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "holds SDXL data, but" in err and "is Stage C" in err and "Re-run `ppd-train prepare` for Stage C" in err
    stage_c_data = DPOData(torch.zeros(2, 16, 4, 4), torch.ones(2, 16, 4, 4), torch.zeros(2, dtype=torch.long),
                           torch.zeros(2, dtype=torch.long), torch.zeros(1, 77, 32), torch.zeros(1, 1, 32), ["u"])
    stage_c_data.save(tmp_path / "stage_c_data.safetensors")
    loaded = DPOData.load(tmp_path / "stage_c_data.safetensors")
    assert loaded.base == "stage_c" and loaded.time_ids is None
    with pytest.raises(PPDError, match=r"holds Stage C data, but the SDXL model is SDXL"):
        loaded.check_fits(tiny_sdxl.config, "the data", "the SDXL model")
    assert main([*argv[:2], f"stage_c={tiny_stage_c_dir}", "--set", f"sdxl={root}", *argv[3:]]) == 2
    assert "set one base model, stage_c or sdxl, not both" in capsys.readouterr().err


def test_tune_user_on_sdxl(sdxl_files, tiny_sdxl_dir, tmp_path, capsys):
    root, folders, _ = sdxl_files
    assert _fit(root, tiny_sdxl_dir, tmp_path / "run", "--set", "max_steps=2") == 0
    common = ["tune-user", "--sdxl", str(tiny_sdxl_dir), "--adapter", str(tmp_path / "run" / "adapter.safetensors"),
              "--embedding", str(tmp_path / "start.safetensors"), "--steps", "2", "--quiet", "--device", "cpu",
              "--dtype", "float32"]
    UserEmbedding(torch.randn(3, 8), "test").save(tmp_path / "start.safetensors")
    assert main([*common, "--data", str(root / "data.safetensors"), "--user", "user1",
                 "--out", str(tmp_path / "tuned.safetensors")]) == 0
    assert UserEmbedding.load(tmp_path / "tuned.safetensors").tokens.shape == (3, 8)
    assert main([*common, "--pairs", folders[2], "--image-size", "16", "--out", str(tmp_path / "t2.safetensors")]) == 0
    capsys.readouterr()
    assert main([*common, "--stage-c", str(tiny_sdxl_dir), "--data", str(root / "data.safetensors"),
                 "--user", "user1", "--out", str(tmp_path / "t3.safetensors")]) == 2
    assert "--stage-c (Stable Cascade Stage C) or --sdxl (SDXL), one of the two" in capsys.readouterr().err


def test_sdxl_sampler_is_ddim_on_the_model_folders_schedule(tiny_sdxl_dir, tiny_sdxl):
    """sdxl_ddim_sample, step by step by hand with the alphas of the model folder's own scheduler config."""
    from diffusers import DDPMScheduler
    from helpers import sdxl_inputs

    from ppd_train.schedule import sdxl_ddim_sample

    alphas = DDPMScheduler.from_pretrained(tiny_sdxl_dir / "scheduler", local_files_only=True).alphas_cumprod
    inputs = sdxl_inputs()
    kw = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}

    def denoise(x, t):
        return tiny_sdxl(x, t, **kw).sample

    x = inputs["sample"]
    with torch.no_grad():
        for step, nxt in ((920, 613), (613, 306), (306, None)):  # t_start 0.92, 3 steps: ratios .92 .613 .307 0
            eps = denoise(x, torch.tensor([step, step]))
            ab, ab_next = alphas[step], alphas[nxt] if nxt is not None else torch.tensor(1.0)
            x = ab_next.sqrt() * (x - (1 - ab).sqrt() * eps) / ab.sqrt() + (1 - ab_next).sqrt() * eps
    torch.testing.assert_close(sdxl_ddim_sample(denoise, inputs["sample"], 3, t_start=0.92), x)


def test_eval_on_sdxl(sdxl_files, tiny_sdxl_dir, tmp_path, monkeypatch, capsys):
    import json
    import sys

    root, _, _ = sdxl_files
    assert _fit(root, tiny_sdxl_dir, tmp_path / "run", "--set", "max_steps=2") == 0
    (tmp_path / "sdxl_rewards.py").write_text("def brightness(user_id, latents, caption_idx):\n"
                                              "    return latents.mean(dim=(1, 2, 3))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    ev = tmp_path / "eval.toml"
    ev.write_text(f'sdxl = "{tiny_sdxl_dir}"\nadapter = "{tmp_path / "run" / "adapter.safetensors"}"\n'
                  f'embeddings = "{root / "users.safetensors"}"\ndata = "{root / "data.safetensors"}"\n'
                  f'reward = "sdxl_rewards:brightness"\nsamples = 2\nsteps = 2\nout = "{tmp_path / "m.json"}"\n')
    try:
        assert main(["eval", "--config", str(ev)]) == 0
    finally:
        sys.modules.pop("sdxl_rewards", None)
    metrics = json.loads((tmp_path / "m.json").read_text())
    assert metrics["seen"]["users"] == 3 and metrics["heldout"]["users"] == 1
    assert all(0.0 <= m["win_rate"] <= 1.0 for m in metrics["users"].values())


def test_the_synthetic_world_runs_on_sdxl(tmp_path):
    """`ppd-train demo --set world.base="sdxl"`: a tiny SDXL pre-trained on the world (4 latent channels), the adapter
    trained and evaluated through the same code; a micro world here (the targets are the sweep's business)."""
    import json

    from ppd_train.synthetic import World, WorldConfig

    world = World(WorldConfig(base="sdxl", k_styles=3), seed=0)
    assert world.caption_means.shape[1] == 4 and world.pooled.shape[-1] == 16
    micro = ["world.base=\"sdxl\"", "world.seen_users=4", "world.unseen_users=2", "world.unseen_mixtures=1",
             "world.pairs_per_user=8", "world.embedding_views=2", "world.pretrain_steps=4", "world.pretrain_batch=8",
             "world.eval_samples=2", "world.sample_steps=2", "train.max_steps=2", "train.batch_size=4",
             "train.val_draws=1"]
    argv = ["demo", "--out", str(tmp_path / "demo"), "--quiet"] + [a for kv in micro for a in ("--set", kv)]
    assert main(argv) == 0
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    assert metrics["config"]["world"]["base"] == "sdxl" and (tmp_path / "demo" / "base_sdxl" / "config.json").is_file()
    assert load_adapter(metrics["adapter"]).config.base == "sdxl"
    assert {m["group"] for m in metrics["users"].values()} >= {"seen", "unseen"}
    with pytest.raises(PPDError, match="world.base = 'flux'"):
        World(WorldConfig(base="flux"), seed=0)
