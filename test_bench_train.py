"""Tests of bench_train.py's projections: the paper protocols' step counts and times from given rates."""
from __future__ import annotations

import math

import pytest

import bench_train


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
