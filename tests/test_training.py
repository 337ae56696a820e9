"""example_training.py: it learns, it is reproducible, it resumes, and bad arguments give one line."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import example_training as et
from conftest import requires_cuda

ROOT = Path(__file__).resolve().parent.parent
SMALL = ["--device", "cpu", "--seq-len", "6", "--n-layer", "1", "--batch-size", "16"]


def run_script(*args, timeout=900):
    return subprocess.run([sys.executable, str(ROOT / "example_training.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=ROOT)


def test_loss_falls_on_cpu(tmp_path):
    args = et.parse_args(SMALL + ["--steps", "100", "--out", str(tmp_path)])
    result = et.train(args, et.Sorting(args.seq_len), log=False)
    losses = [point[1] for point in result["curve"]]
    assert len(losses) == 2 and losses[-1] < 0.6 * losses[0]
    assert result["accuracy"] > 0.0


def test_check_reproducible_on_cpu(tmp_path):
    result = run_script(*SMALL, "--steps", "30", "--check-reproducible", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Reproducible: yes" in result.stdout


def test_resume_ends_bit_identical_to_an_uninterrupted_run(tmp_path, monkeypatch):
    common = SMALL + ["--steps", "40", "--ckpt-every", "20", "--deterministic"]
    whole = et.train(et.parse_args(common + ["--out", str(tmp_path / "whole")]), et.Sorting(6), log=False)

    task = et.Sorting(6)
    real_batch, calls = task.batch, []

    def interrupted_batch(*args, **kwargs):  # dies at step 30, after the checkpoint of step 20
        calls.append(1)
        if len(calls) > 30:
            raise KeyboardInterrupt
        return real_batch(*args, **kwargs)

    monkeypatch.setattr(task, "batch", interrupted_batch)
    with pytest.raises(KeyboardInterrupt):
        et.train(et.parse_args(common + ["--out", str(tmp_path / "cut")]), task, log=False)
    monkeypatch.setattr(task, "batch", real_batch)
    resumed = et.train(et.parse_args(common + ["--out", str(tmp_path / "cut"), "--resume"]), task, log=False)
    a, b = whole["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[name], b[name]) for name in a)
    assert whole["curve"][-1][:3] == resumed["curve"][-1][:3]


def test_character_model_on_a_text_file(tmp_path):
    result = run_script("--data", str(ROOT / "README.md"), "--device", "cpu", "--seq-len", "32", "--n-layer", "1",
                        "--steps", "20", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "character model" in result.stdout and (tmp_path / "loss_curve.csv").exists()


@pytest.mark.parametrize("args,words", [
    (["--attention", "magic"], ["--attention", "magic"]),
    (["--data", "no/such/file.txt"], ["--data", "no such file"]),
    (["--seq-len", "5000"], ["--seq-len 5000", "2048"]),
    (["--seq-len", "1"], ["--seq-len 1"]),
    (["--n-embd", "100"], ["--n-embd", "64"]),
    (["--steps", "0"], ["--steps", "at least 1"]),
])
def test_bad_arguments_end_with_one_line(args, words):
    result = run_script("--device", "cpu", *args, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("example_training.py: error:"), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


@requires_cuda
def test_default_run_reaches_the_target_on_cuda(tmp_path):
    result = run_script("--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Target accuracy 99% reached" in result.stdout, result.stdout


@requires_cuda
def test_check_reproducible_on_cuda(tmp_path):
    result = run_script("--steps", "300", "--check-reproducible", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert "Reproducible: yes" in result.stdout, result.stdout
