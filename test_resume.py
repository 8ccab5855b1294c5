"""Tests of checkpoints and --resume, of refusing bad input before training, and of failed runs leaving no results."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import baselines
import train

HERE = Path(__file__).resolve().parent
MNIST_RAW = Path(os.environ.get("SNV_DATA_DIR", "data")) / "MNIST" / "raw"
"""The real MNIST files, read as train.py does (README: Tests)."""
NO_MNIST = "real MNIST not available (set SNV_DATA_DIR to the folder containing MNIST/raw)"


def mnist_available() -> bool:
    """Whether the four MNIST files are under MNIST_RAW."""
    return len(list(MNIST_RAW.glob("*.gz"))) == 4


KILL_AFTER_TWO_TASKS = """
import os, signal, sys
import train
save = train.save_checkpoint
def save_then_die(path, args, seed, model, state, gen, progress):
    save(path, args, seed, model, state, gen, progress)
    if progress["tasks_done"] == 2:
        os.kill(os.getpid(), signal.SIGKILL)
train.save_checkpoint = save_then_die
sys.exit(train.main(sys.argv[1:]))
"""


class Killed(Exception):
    """Stands in for the process being killed."""


def cli(out: Path, *extra: str) -> list[str]:
    """A small synthetic run writing to `out`."""
    return ["--dataset", "synthetic", "--width", "32", "--epochs", "3", "--max-permutations", "8",
            "--shapley-eval-batches", "1", "--out-dir", str(out), "--seeds", "0", "--no-figures", *extra]


def run(*argv: str) -> subprocess.CompletedProcess:
    """A Python subprocess in the project folder (one thread: the same arithmetic in every run)."""
    return subprocess.run([sys.executable, *argv], cwd=HERE, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})


def files_under(folder: Path) -> list[Path]:
    """Every file below `folder` (none if it does not exist)."""
    return sorted(p for p in folder.rglob("*") if p.is_file()) if folder.exists() else []


def one_line_error(err: str, *needles: str) -> None:
    """The error is a single `error: ...` line containing every needle."""
    assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
    for needle in needles:
        assert needle in err, err


# ----------------------------------------------------------------------------- kill and resume

def test_killed_run_resumes_to_identical_results(tmp_path, capsys):
    reference = run("train.py", *cli(tmp_path / "ref", "--num-tasks", "4"))
    assert reference.returncode == 0, reference.stderr
    out = tmp_path / "run"
    killed = run("-c", KILL_AFTER_TWO_TASKS, *cli(out, "--num-tasks", "4"))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    checkpoint = out / "checkpoint_seed0.pt"
    assert torch.load(checkpoint, weights_only=True)["tasks_done"] == 2
    assert not (out / "seed0.json").exists() and not (out / "summary.json").exists()

    assert train.main(cli(out, "--num-tasks", "4")) == 2  # an existing checkpoint needs --resume or --overwrite
    one_line_error(capsys.readouterr().err, "--resume", "--overwrite", str(checkpoint))

    resumed = run("train.py", *cli(out, "--num-tasks", "4", "--resume"))
    assert resumed.returncode == 0, resumed.stderr
    assert "task 1/4" not in resumed.stdout and "task 3/4" in resumed.stdout
    assert not checkpoint.exists()  # deleted once the results JSON is written
    a, b = (json.loads((d / "seed0.json").read_text()) for d in (tmp_path / "ref", out))
    for key in ("accuracy_matrix", "metrics", "epochs_run", "silent_units", "random_init_accuracy"):
        assert a[key] == b[key], key
    assert [s["phi"] for s in a["shapley"]] == [s["phi"] for s in b["shapley"]]
    assert [s["frozen_total"] for s in a["shapley"]] == [s["frozen_total"] for s in b["shapley"]]

    # resuming a finished seed keeps its results; its settings must still match
    before = (out / "seed0.json").read_bytes()
    assert train.main(cli(out, "--num-tasks", "4", "--resume")) == 0
    assert (out / "seed0.json").read_bytes() == before and (out / "summary.json").exists()
    capsys.readouterr()
    assert train.main(cli(out, "--num-tasks", "4", "--resume", "--lr", "0.01")) == 2
    one_line_error(capsys.readouterr().err, "other settings", "lr 0.001 -> 0.01")


@pytest.fixture(scope="module")
def one_task_checkpoint(tmp_path_factory) -> Path:
    """A genuine checkpoint of synthetic seed 0 after its first task (the run is stopped there)."""
    out = tmp_path_factory.mktemp("ckpt") / "out"
    save = train.save_checkpoint

    def save_then_stop(*a, **kw) -> None:
        save(*a, **kw)
        raise Killed

    train.save_checkpoint = save_then_stop
    try:
        with pytest.raises(Killed):
            train.main(cli(out))
    finally:
        train.save_checkpoint = save
    return out / "checkpoint_seed0.pt"


def test_corrupt_checkpoint_is_refused_and_kept(tmp_path, capsys):
    checkpoint = tmp_path / "out" / "checkpoint_seed0.pt"
    checkpoint.parent.mkdir()
    checkpoint.write_bytes(b"\x00garbage\xff" * 100)
    for extra, needles in ((["--resume"], ("corrupt checkpoint", "--overwrite")), ([], ("--resume",))):
        assert train.main(cli(tmp_path / "out", *extra)) == 2
        one_line_error(capsys.readouterr().err, str(checkpoint), *needles)
        assert checkpoint.read_bytes() == b"\x00garbage\xff" * 100
        assert files_under(tmp_path / "out") == [checkpoint]


@pytest.mark.parametrize("extra,needles", [
    (["--lr", "0.01"], ("other settings", "lr 0.001 -> 0.01")),
    (["--scenario", "class_il"], ("other settings", "scenario 'task_il' -> 'class_il'")),
    (["--seeds", "1"], ("seed 0, not synthetic seed 1",)),
    (["--dataset", "pmnist", "--data-dir", str(MNIST_RAW.parent.parent)], ("dataset synthetic seed 0, not pmnist",)),
    (["format"], (f"format version {train.FORMAT_VERSION}, but this train.py reads version "
                  f"{train.FORMAT_VERSION + 1}",)),
])
def test_mismatched_checkpoint_is_refused_and_kept(tmp_path, capsys, monkeypatch, one_task_checkpoint, extra, needles):
    if extra == ["format"]:
        monkeypatch.setattr(train, "FORMAT_VERSION", train.FORMAT_VERSION + 1)
        extra = []
    if "pmnist" in extra and not mnist_available():
        pytest.skip(NO_MNIST)
    out = tmp_path / "out"
    out.mkdir()
    seed = extra[extra.index("--seeds") + 1] if "--seeds" in extra else "0"
    checkpoint = out / f"checkpoint_seed{seed}.pt"
    shutil.copy(one_task_checkpoint, checkpoint)
    before = checkpoint.read_bytes()
    assert train.main(cli(out, *extra, "--resume")) == 2
    one_line_error(capsys.readouterr().err, str(checkpoint), "--overwrite", *needles)
    assert checkpoint.read_bytes() == before and files_under(out) == [checkpoint]


def test_overwrite_starts_a_checkpointed_seed_over(tmp_path, one_task_checkpoint):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(one_task_checkpoint, out / "checkpoint_seed0.pt")
    assert train.main(cli(out, "--overwrite", "--lr", "0.01", "--epochs", "1", "--num-tasks", "2")) == 0
    assert sorted(p.name for p in files_under(out)) == ["log_seed0.jsonl", "seed0.json", "summary.json"]


def test_baseline_resume_keeps_finished_seeds_and_refuses_its_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    ewc = ("--method", "ewc", "--num-tasks", "2", "--epochs", "1")
    assert train.main(cli(out, *ewc)) == 0
    finished = (out / "seed0.json").read_bytes()
    checkpoint = out / "checkpoint_seed1.pt"  # seed 1 interrupted: EWC's Fisher terms are not in it
    checkpoint.write_bytes(b"interrupted")
    (out / "summary.json").unlink()
    assert train.main(cli(out, *ewc, "--seeds", "0", "1", "--resume")) == 2
    one_line_error(capsys.readouterr().err, str(checkpoint), "cannot continue", "--seeds 1 --overwrite")
    assert files_under(out) == [checkpoint, out / "log_seed0.jsonl", out / "seed0.json"]
    checkpoint.unlink()
    assert train.main(cli(out, *ewc, "--seeds", "0", "1", "--resume")) == 0
    assert (out / "seed0.json").read_bytes() == finished
    assert json.loads((out / "summary.json").read_text())["runs"] == [0, 1]


# ----------------------------------------------------------------------------- bad input

def test_unwritable_out_dir(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert train.main(cli(blocker / "sub")) == 2
    one_line_error(capsys.readouterr().err, "--out-dir", "not writable")
    assert files_under(tmp_path) == [blocker]


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("flags,needle", [(["--device", "cuda"], "--device cuda"),
                                          (["--dist-backend", "nccl"], "--dist-backend nccl")])
def test_cuda_without_cuda(tmp_path, capsys, flags, needle):
    assert train.main(cli(tmp_path / "out", *flags)) == 2
    one_line_error(capsys.readouterr().err, needle)
    assert files_under(tmp_path) == []


def test_resume_and_overwrite_exclude_each_other(tmp_path, capsys):
    assert train.main(cli(tmp_path / "out", "--resume", "--overwrite")) == 2
    one_line_error(capsys.readouterr().err, "--resume and --overwrite")
    assert files_under(tmp_path) == []


def test_corrupt_mnist_file(tmp_path, capsys):
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    if not mnist_available():
        pytest.skip(NO_MNIST)
    for f in MNIST_RAW.glob("*.gz"):
        shutil.copy(f, raw / f.name)
    bad = raw / "train-labels-idx1-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:1000] + b"garbage")
    assert train.main(cli(tmp_path / "out", "--dataset", "pmnist", "--data-dir", str(tmp_path / "data"))) == 2
    one_line_error(capsys.readouterr().err, str(bad), "md5 mismatch")
    assert files_under(tmp_path / "out") == [] and len(files_under(raw)) == 4


def test_nan_loss_leaves_no_results(tmp_path, capsys):
    assert train.main(cli(tmp_path / "out", "--lr", "1e30")) == 2
    one_line_error(capsys.readouterr().err, "non-finite loss", "task 1, epoch 1", "--lr")
    assert files_under(tmp_path / "out") == []


def test_config_diff_treats_a_missing_setting_as_its_default():
    current = train.result_config(vars(train.build_parser().parse_args(["--lr", "0.01"]))) | {"world_size": 1}
    older = {k: v for k, v in current.items() if k not in ("bandit_threshold", "world_size")}
    assert train.config_diff(older, current) == ""
    changed = dict(older, bandit_threshold="midpoint")
    assert train.config_diff(changed, current) == "bandit_threshold 'midpoint' -> 'kth'"


@pytest.mark.parametrize("method, default", [("snv", "shapley"), ("eidetic", "taylor")])
def test_config_diff_fills_a_missing_setting_with_its_per_method_default(method, default):
    args = train.build_parser().parse_args(["--method", method])
    args.world_size = 1
    baselines.resolve_args(args)
    current = train.result_config(vars(args))
    assert current["importance"] == default
    older = {k: v for k, v in current.items() if k != "importance"}
    assert train.config_diff(older, current) == ""
    assert train.config_diff(dict(older, method="sgd"), current) == f"importance None -> {default!r}, method 'sgd' -> {method!r}"
