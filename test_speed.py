"""Tests of the opt-in speed flags (--amp, --channels-last): off by default, recorded, and doing what they say."""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import train


def run(tmp_path: Path, name: str, *extra: str) -> dict:
    """A tiny synthetic run (3 tasks, 2 epochs, width 8); its seed JSON."""
    out = tmp_path / name
    assert train.main(["--dataset", "synthetic", "--width", "8", "--epochs", "2", "--max-permutations", "2",
                       "--shapley-eval-batches", "1", "--out-dir", str(out), "--seeds", "0", "--no-figures",
                       *extra]) == 0
    return json.loads((out / "seed0.json").read_text())


def outputs(result: dict) -> list:
    return [result["accuracy_matrix"], result["metrics"], result["random_init_accuracy"],
            [s["phi"] for s in result["shapley"]]]


def test_speed_flags_are_off_by_default_and_recorded(tmp_path):
    args = train.build_parser().parse_args([])
    assert (args.amp, args.channels_last) == ("none", False)
    plain, flagged = run(tmp_path, "plain"), run(tmp_path, "flagged", "--channels-last")
    assert (plain["args"]["amp"], plain["args"]["channels_last"], flagged["args"]["channels_last"]) == (
        "none", False, True)
    assert outputs(plain) == outputs(flagged)  # the MLP flattens its input: --channels-last changes nothing
    assert {"amp", "channels_last"}.isdisjoint(train.RUN_ONLY_ARGS)  # they change results: --resume compares them


def test_amp_bf16_autocasts_the_training_forward_only(tmp_path, monkeypatch):
    seen: set[tuple[bool, torch.dtype]] = set()
    build = train.build_model

    def recorded(*a, **k):
        model = build(*a, **k)
        model.layers[0].producer.register_forward_hook(lambda m, i, out: seen.add((m.training, out.dtype)))
        return model

    monkeypatch.setattr(train, "build_model", recorded)
    amp = run(tmp_path, "amp", "--amp", "bf16")
    # training forwards in bf16; evaluation (accuracy matrix, validation loss, mu, V(S)) in fp32
    assert seen == {(True, torch.bfloat16), (False, torch.float32)}
    monkeypatch.undo()
    fp32 = run(tmp_path, "fp32")
    assert amp["args"]["amp"] == "bf16"
    assert all(math.isfinite(a) for row in amp["accuracy_matrix"] for a in row if a is not None)
    assert all(math.isfinite(p) for s in amp["shapley"] for p in s["phi"])
    assert outputs(amp) != outputs(fp32)


def test_channels_last_gives_the_same_accuracies_on_a_tiny_resnet(tmp_path, monkeypatch):
    formats: set[bool] = set()
    build = train.build_model

    def recorded(*a, **k):
        model = build(*a, **k)
        model.conv1.register_forward_hook(lambda m, i, out: formats.add(
            i[0].is_contiguous(memory_format=torch.channels_last) and m.weight.is_contiguous(
                memory_format=torch.channels_last)))
        return model

    monkeypatch.setattr(train, "build_model", recorded)
    flagged = run(tmp_path, "cl", "--arch", "resnet18", "--width", "4", "--channels-last")
    assert True in formats  # not vacuous: the training and evaluation batches and weights were channels_last
    monkeypatch.undo()
    plain = run(tmp_path, "plain", "--arch", "resnet18", "--width", "4")
    assert flagged["accuracy_matrix"] == plain["accuracy_matrix"]
    assert flagged["random_init_accuracy"] == plain["random_init_accuracy"]
    for a, b in zip(flagged["shapley"], plain["shapley"], strict=True):
        assert a["phi"] == pytest.approx(b["phi"], abs=1e-5)
