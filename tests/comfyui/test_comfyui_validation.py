"""Queue-time validation through ComfyUI's own ``execution.validate_inputs``: what a user sees when a prompt with a bad
value is submitted (HTTP 400 with these errors), for constant widgets and for values arriving through links."""

from __future__ import annotations

import asyncio
import importlib

import pytest


class _FloatSource:  # any upstream node making a FLOAT (a primitive, a math node): unknown at queue time
    RETURN_TYPES = ("FLOAT",)


def _prompt(**widgets) -> dict:
    links = {"model": ["10", 0], "ppd_adapter": ["11", 0], "user_embedding": ["12", 0]}
    values = {"weight": 1.0, "start_percent": 0.0, "end_percent": 1.0, **widgets}
    return {"1": {"class_type": "PPDApplyAdapter", "inputs": {**links, **values}},
            "10": {"class_type": "UNETLoader", "inputs": {}},
            "11": {"class_type": "PPDAdapterLoader", "inputs": {}},
            "12": {"class_type": "PPDLoadUserEmbedding", "inputs": {}},
            "13": {"class_type": "FloatSource", "inputs": {}}}


@pytest.fixture()
def validate(comfy, monkeypatch):
    execution = importlib.import_module("execution")
    nodes = importlib.import_module("nodes")
    pack_nodes = importlib.import_module("ppd_pack.nodes")
    for name in ("PPDApplyAdapter", "PPDAdapterLoader", "PPDLoadUserEmbedding"):
        monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, name, pack_nodes.NODE_CLASS_MAPPINGS[name])
    monkeypatch.setitem(nodes.NODE_CLASS_MAPPINGS, "FloatSource", _FloatSource)

    def run(**widgets):
        upstream = {i: (True, [], i) for i in ("10", "11", "12", "13")}  # loaders: validated on their own
        ok, errors, _ = asyncio.run(execution.validate_inputs("p", _prompt(**widgets), "1", upstream))
        return ok, " ".join(str(e.get("details", "")) for e in errors)
    return run


def test_start_after_end_is_refused_when_queued(validate):
    ok, details = validate(start_percent=0.8, end_percent=0.2)
    assert not ok and "start_percent (0.8) is after end_percent (0.2)" in details


def test_ranges_still_hold_for_the_inputs_validate_inputs_takes_over(validate):
    # naming an input in VALIDATE_INPUTS switches off ComfyUI's own min/max check for it: ours must make it
    assert validate() == (True, "")
    ok, details = validate(weight=5.0)
    assert not ok and "'weight' must be between 0 and 3" in details
    ok, details = validate(end_percent=1.5)
    assert not ok and "'end_percent' must be between 0 and 1" in details


def test_linked_values_pass_queue_time_and_are_checked_when_run(validate, comfy):
    assert validate(weight=["13", 0], start_percent=["13", 0])[0] is True
    node = importlib.import_module("ppd_pack.nodes.adapter_nodes").PPDApplyAdapter()
    with pytest.raises(Exception, match="'weight' must be a finite number"):
        node.apply(None, None, None, float("nan"), 0.0, 1.0)
