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


def test_channels_last_trains_and_evaluates_a_tiny_resnet_as_the_default_does(tmp_path):
    # One training phase from the same weights, then evaluation: equal up to float rounding (over a whole run the
    # rounding differences grow through training, as with any change of kernels).
    results = []
    for extra in ((), ("--channels-last",)):
        args = train.resolve_args(train.build_parser().parse_args([
            "--dataset", "synthetic", "--arch", "resnet18", "--width", "4", "--out-dir", str(tmp_path / str(len(extra))),
            "--no-figures", *extra]))
        bench = train.datasets.get_benchmark("synthetic", 3, 0, None)
        torch.manual_seed(0)
        model = train.build_model("resnet18", bench.input_shape, 4).to(memory_format=train.memory_format(args))
        model.add_head(2)
        state = train.State(torch.zeros(model.num_neurons, dtype=torch.bool))
        seen = []
        model.conv1.register_forward_hook(lambda m, i, out: seen.append(
            i[0].is_contiguous(memory_format=torch.channels_last) and not i[0].is_contiguous()))
        train.train_phase(model, bench, 0, [0], 1, train.snv_core.Freezer(model, state.frozen, 0), state, args,
                          torch.device("cpu"), torch.Generator().manual_seed(0), "task 1")
        evaluation = train.evaluate(model, bench.tasks[0].test, 0, 0, args, state, torch.device("cpu"), 2)
        results.append((set(seen), [p.detach().clone() for p in model.parameters()], evaluation))
    (plain_formats, plain, (plain_acc, plain_loss)), (cl_formats, flagged, (cl_acc, cl_loss)) = results
    assert plain_formats == {False} and cl_formats == {True}  # not vacuous: every batch was channels_last
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(plain, flagged, strict=True))
    assert cl_acc == plain_acc and cl_loss == pytest.approx(plain_loss, rel=1e-4)
