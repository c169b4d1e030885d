"""Training checkpoints hold the adapter, every optimizer state entry (tensors and plain numbers) and the run's
metadata, and refuse to load into something they were not made for."""

from __future__ import annotations

import json

import pytest
import torch

from ppd_train.checkpoint import load_checkpoint, read_meta, save_checkpoint
from ppd_train.errors import FileFormatError


def _model(seed: int = 0, width: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(width, 2), torch.nn.Linear(2, 1))


def _step(model, opt) -> None:
    opt.zero_grad()
    model(torch.ones(4, model[0].in_features)).square().sum().backward()
    opt.step()


def _adafactor(params):
    """transformers' Adafactor keeps plain numbers in its state (``step`` is an int), beside tensors."""
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=0.1, relative_step=False, scale_parameter=False, warmup_init=False)


@pytest.mark.parametrize("make", [lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.01), _adafactor])
def test_round_trip_restores_weights_and_optimizer_state(tmp_path, make):
    model = _model()
    opt = make(model.parameters())
    for _ in range(2):
        _step(model, opt)
    save_checkpoint(tmp_path / "c.safetensors", model, opt, {"step": 2, "note": "x"})
    fresh = _model(seed=1)
    fresh_opt = make(fresh.parameters())
    meta = load_checkpoint(tmp_path / "c.safetensors", fresh, fresh_opt)
    assert meta["step"] == 2 and meta["note"] == "x"
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))
    want, got = opt.state_dict(), fresh_opt.state_dict()
    assert json.loads(json.dumps(want["param_groups"])) == got["param_groups"]  # JSON: tuples come back as lists
    assert want["state"].keys() == got["state"].keys() and want["state"]
    for i, entries in want["state"].items():
        assert entries.keys() == got["state"][i].keys()
        for k, v in entries.items():
            assert torch.equal(v, got["state"][i][k]) if torch.is_tensor(v) else v == got["state"][i][k], (i, k)
    _step(model, opt)  # and training goes on identically
    _step(fresh, fresh_opt)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values()))


def test_refuses_another_model_or_optimizer(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt)
    save_checkpoint(tmp_path / "c.safetensors", model, opt, {})
    other = _model(width=5)
    with pytest.raises(FileFormatError, match="holds another adapter .*size mismatch.*Use another out_dir"):
        load_checkpoint(tmp_path / "c.safetensors", other, torch.optim.AdamW(other.parameters()))
    same = _model()
    with pytest.raises(FileFormatError, match="optimizer state does not fit this adapter"):
        load_checkpoint(tmp_path / "c.safetensors", same, torch.optim.AdamW(list(same.parameters())[:2]))


def test_files_that_are_not_checkpoints(tmp_path):
    from safetensors.torch import save_file

    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(FileFormatError, match="training checkpoint file not found"):
        load_checkpoint(tmp_path / "step-1.safetensors", model, opt)
    save_file({"x": torch.zeros(1)}, tmp_path / "other.safetensors")
    with pytest.raises(FileFormatError, match=r"not a training checkpoint \(no 'ppd_checkpoint' metadata\)"):
        load_checkpoint(tmp_path / "other.safetensors", model, opt)


def test_read_meta_gives_the_run_metadata_or_none(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters())
    _step(model, opt)
    save_checkpoint(tmp_path / "c.safetensors", model, opt, {"step": 7, "config": {"lr": 0.5}})
    meta = read_meta(tmp_path / "c.safetensors")
    assert meta is not None and (meta["step"], meta["config"]) == (7, {"lr": 0.5})
    assert meta["optimizer"]["param_groups"][0]["lr"] == 0.001  # AdamW's default, as saved
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "c.safetensors").read_bytes()[:20])
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"), {"other": "1"})
    assert read_meta(tmp_path / "cut.safetensors") is None and read_meta(tmp_path / "plain.safetensors") is None


class _TwoAverages(torch.optim.Optimizer):
    """A real (if simple) optimizer whose state names hold dots, as any optimizer's may: SGD on a running mean of
    the gradient, keeping ``avg.grad`` (a tensor) and ``avg.count`` (a plain number) per parameter."""

    def __init__(self, params, lr: float = 0.1) -> None:
        super().__init__(params, {"lr": lr})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                state = self.state[p]
                if not state:
                    state["avg.grad"], state["avg.count"] = torch.zeros_like(p), 0
                state["avg.count"] += 1
                state["avg.grad"].add_((p.grad - state["avg.grad"]) / state["avg.count"])
                p.sub_(group["lr"] * state["avg.grad"])


def test_state_names_holding_dots_round_trip(tmp_path):
    """The file's keys are ``optim.<param>.<name>`` (tensors) and ``<param>.<name>`` (numbers): a name is everything
    after the parameter's index, dots and all."""
    model = _model()
    opt = _TwoAverages(model.parameters())
    for _ in range(3):
        _step(model, opt)
    save_checkpoint(tmp_path / "c.safetensors", model, opt, {})
    fresh = _model(seed=1)
    fresh_opt = _TwoAverages(fresh.parameters())
    load_checkpoint(tmp_path / "c.safetensors", fresh, fresh_opt)
    got = fresh_opt.state_dict()["state"]
    assert sorted(got) == [0, 1, 2, 3] and all(sorted(s) == ["avg.count", "avg.grad"] for s in got.values())
    assert [s["avg.count"] for s in got.values()] == [3, 3, 3, 3]
    for i, s in opt.state_dict()["state"].items():
        assert torch.equal(s["avg.grad"], got[i]["avg.grad"]), i
