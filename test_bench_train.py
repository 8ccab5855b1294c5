"""Tests of bench_train.py's projections: the paper protocols' step counts and times from given rates."""
from __future__ import annotations

import math

import pytest

import bench_train
import train


def test_projection_arithmetic() -> None:
    trained = {name: {"steps_per_s": s, "images_per_s": s * bench_train.MODELS[name][2], "neurons": n}
               for name, s, n in (("mlp", 100.0, 800), ("resnet32", 2.0, 4800), ("resnet224", 0.5, 4800))}
    pipes = {"in_memory_pmnist": {"images_per_s": 1000.0}, "in_memory_cifar100": {"images_per_s": 6400.0},
             "in_memory_tinyimagenet": {"images_per_s": 3200.0}, "imagenet_loader": {"images_per_s": 128.0}}
    shapley = {"mlp": {"coalitions_per_s": 80.0, "images": 512, "neurons": 800},
               "resnet32": {"coalitions_per_s": 8.0, "images": 64, "neurons": 4800}}
    p = bench_train.projections(trained, pipes, shapley)
    cifar = p["cifar100"]  # 6000 images: 4200 train (66 steps of 64), 600 val; 200 + 20 epochs
    assert (cifar["train_images_per_task"], cifar["steps_per_epoch"]) == (4200, 66)
    step = 1 / 2.0 + 64 / 6400.0
    epoch = 66 * step + 600 * step / 64 / 3
    shapley_s = 200 * 4800 / (8.0 * 64 / 512)
    assert cifar["step_s"] == pytest.approx(step)
    assert cifar["per_task_hours"] == pytest.approx((220 * epoch + shapley_s) / 3600)
    assert cifar["per_run_hours"] == pytest.approx(10 * cifar["per_task_hours"])
    imagenet = p["imagenet1k"]  # step 2 s, loading a batch 1 s: the max
    assert imagenet["step_s"] == pytest.approx(max(1 / 0.5, 128 / 128.0))
    assert imagenet["steps_per_epoch"] == math.ceil(bench_train.split_sizes(133_116)[0] / 128)
    tiny = p["tinyimagenet"]  # resnet64 not measured: 4x resnet32's step time, noted
    assert tiny["step_s"] == pytest.approx(4 / 2.0 + 64 / 3200.0) and any("4x" in n for n in tiny["notes"])
    assert p["pmnist"]["steps_per_epoch"] == 4900 and all(v["kind"] == "projection" for v in p.values())


def test_train_step_before_and_after_compute_the_same_step(tmp_path) -> None:
    """The train_step_speedup case compares like with like: BEFORE_COMMIT's data pipeline, Freezer and autograd
    step train the model to the same bits as the current ones with the MLP's hand-written backward (only the work
    around the arithmetic differs)."""
    import torch

    import datasets
    import snv_core
    before, core_before = bench_train.load_before("datasets"), bench_train.load_before("snv_core")
    if before is None or core_before is None:
        pytest.skip("git history without BEFORE_COMMIT (shallow clone)")
    datasets.write_standin("cifar100", tmp_path, per_class=1)
    models = []
    for ds, core, step in ((before, core_before, bench_train.step_before), (datasets, snv_core, train.train_step)):
        split = bench_train.in_memory_splits(tmp_path, ds)["in_memory_pmnist"][0]
        run, model = bench_train.masked_epoch(split, core.Freezer, step, torch.device("cpu"))
        start = model.linears[0].weight.detach().clone()
        run()
        models.append(model)
    new = dict(models[1].named_parameters())
    assert all(torch.equal(p, new[n]) for n, p in models[0].named_parameters())
    assert not torch.equal(start, models[1].linears[0].weight)  # it trained
