"""example_training.py: it learns, it is reproducible, it resumes, and bad arguments give one line; and the
benchmark scripts that run on the CPU, in a short run each."""

import json
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


def test_model_builds_only_the_attention_it_uses():
    x = torch.randint(0, 17, (3, 13), generator=torch.Generator().manual_seed(0))
    logits = {}
    for attention in ("flash", "sdpa", "naive"):
        torch.manual_seed(0)
        model = et.GPT(et.Config(17, 13, n_layer=2, n_embd=128, attention=attention))
        kinds = {type(m).__name__ for m in model.modules()}
        assert ("FlashAttention" in kinds) == (attention == "flash"), kinds
        logits[attention] = model(x)
    # the same parameters (same seed, attention has none), so the same function up to rounding
    assert torch.allclose(logits["flash"], logits["sdpa"], atol=1e-5)
    assert torch.allclose(logits["naive"], logits["sdpa"], atol=1e-5)


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
    (["--data", "tests"], ["--data tests", "is a directory"]),
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


def one_line_error(result, *words):
    assert result.returncode == 2, (result.returncode, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("example_training.py: error:"), result.stderr
    assert all(w in lines[0] for w in words), lines[0]


def test_unusable_out_is_refused_before_training(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    for out, words in ((a_file, ["--out", "not a directory"]), (a_file / "sub", ["--out", "is a file"])):
        one_line_error(run_script(*SMALL, "--steps", "3", "--out", str(out), timeout=120), *words)
    assert a_file.read_text() == "x" and sorted(tmp_path.iterdir()) == [a_file]  # nothing written


def test_resume_mistakes_end_with_one_line_and_write_nothing(tmp_path):
    one_line_error(run_script(*SMALL, "--steps", "3", "--resume", "--out", str(tmp_path / "none"), timeout=120),
                   "--resume", "no checkpoint", str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()

    out = tmp_path / "run"
    assert run_script(*SMALL, "--steps", "4", "--out", str(out), timeout=300).returncode == 0
    checkpoint = (out / "checkpoint.pt").read_bytes()
    (out / "loss_curve.csv").unlink()
    cases = [
        (["--n-embd", "64"], ["--resume", "--n-embd 128", "--n-embd 64"]),  # 128: the CPU default
        (["--seq-len", "7"], ["--resume", "--seq-len 6", "--seq-len 7"]),
        (["--data", str(ROOT / "README.md")], ["--resume", "--data none (the sorting task)", "README.md"]),
    ]
    for extra, words in cases:
        args = [*SMALL, "--steps", "8", *extra, "--resume", "--out", str(out)]
        one_line_error(run_script(*args, timeout=120), *words)
    for steps in ("2", "4"):
        one_line_error(run_script(*SMALL, "--steps", steps, "--resume", "--out", str(out), timeout=120),
                       f"--steps {steps}", "checkpoint's step 4")
    (tmp_path / "broken.pt").write_bytes(b"not a checkpoint")
    broken = tmp_path / "broken"
    broken.mkdir()
    (tmp_path / "broken.pt").rename(broken / "checkpoint.pt")
    one_line_error(run_script(*SMALL, "--steps", "8", "--resume", "--out", str(broken), timeout=120),
                   "--resume", "cannot be read")
    assert (out / "checkpoint.pt").read_bytes() == checkpoint and not (out / "loss_curve.csv").exists()


@pytest.mark.parametrize("content,words", [("", ["--data", "0 characters", "at least 8"]),
                                           ("abc", ["--data", "3 characters", "--seq-len 6"])])
def test_empty_or_short_data_file_ends_with_one_line(tmp_path, content, words):
    data = tmp_path / "data.txt"
    data.write_text(content)
    one_line_error(run_script(*SMALL, "--data", str(data), "--out", str(tmp_path / "out"), timeout=120), *words)
    assert not (tmp_path / "out").exists()


def test_help_explains_every_option():
    for action in et.make_parser()._actions:
        assert action.help, action.option_strings
    result = run_script("--help", timeout=120)
    assert result.returncode == 0
    assert "default runs/example" in result.stdout and "checkpoint.pt" in result.stdout


def test_training_benchmark_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "rows.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_bench.py"), "--device", "cpu", "--config",
                             "tiny", "--warmup", "1", "--windows", "2", "--window", "2", "--out", str(out)],
                            capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["flash", "flash_det", "sdpa", "naive"]
    for r in rows:
        assert {"config", "impl", "steps_per_s", "peak_mib", "final_loss", "gpu", "date"} <= r.keys()
        assert r["config"] == "tiny" and r["steps_per_s"] > 0 and r["gpu"] == "cpu"
    # one seed, the same batches: every attention ends near the same loss (they differ in rounding only)
    assert max(r["final_loss"] for r in rows) - min(r["final_loss"] for r in rows) < 1e-3
    assert result.stdout.count("| tiny |") == 4


def test_issue_cost_benchmark_smoke_run_on_cpu(tmp_path):
    out = tmp_path / "rows.jsonl"
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "issue_cost.py"), "--device", "cpu", "--calls", "2",
                             "--rounds", "1", "--out", str(out)], capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["impl"] for r in rows] == ["flash", "flash_det", "sdpa"]
    assert all(r["forward_us"] > 0 and r["forward_backward_us"] > 0 and r["device"] == "cpu" for r in rows)
    assert "| flash_det |" in result.stdout


def test_pinned_bits_tool_saves_hashes_and_compares_on_cpu(tmp_path):
    script = str(ROOT / "benchmarks" / "pinned_bits.py")
    saved = subprocess.run([sys.executable, script, "save", str(tmp_path / "a.pt"), "--device", "cpu"],
                           capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert saved.returncode == 0, saved.stderr
    pinned = json.loads((ROOT / "tests" / "deterministic_sha256.json").read_text())
    hashes = json.loads((tmp_path / "a.sha256.json").read_text())
    assert hashes.keys() == pinned.keys() and all(len(h) == 4 for h in hashes.values())
    assert saved.stdout.count("differs from the pinned bits") == len(pinned)  # the reference rounds otherwise
    compared = subprocess.run([sys.executable, script, "compare", str(tmp_path / "a.pt"), str(tmp_path / "a.pt")],
                              capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert compared.returncode == 0, compared.stderr
    assert compared.stdout.count(": identical") == 5 * len(pinned) and "differ," not in compared.stdout


# ---------------------------------------------------------------------------- several processes (torchrun, gloo)

def torchrun(*args, processes=2, timeout=600, script=ROOT / "example_training.py"):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               str(script), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def test_two_processes_learn_reproduce_and_resume_only_with_two(tmp_path):
    result = torchrun(*SMALL, "--steps", "100", "--out", str(tmp_path / "run"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("Final loss") == 1 and "2 processes" in result.stdout  # process 0 alone reports
    rows = (tmp_path / "run" / "loss_curve.csv").read_text().splitlines()[1:]
    losses = [float(row.split(",")[1]) for row in rows]
    assert len(losses) == 2 and losses[-1] < 0.6 * losses[0]

    result = torchrun(*SMALL, "--steps", "30", "--check-reproducible", "--out", str(tmp_path / "twice"))
    assert result.returncode == 0, result.stderr
    assert "Reproducible: yes" in result.stdout and "equal on all 2 processes" in result.stdout, result.stdout

    checkpoint = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    one_line_error(run_script(*SMALL, "--steps", "200", "--resume", "--out", str(tmp_path / "run"), timeout=120),
                   "--resume", "2 process(es)", "this run has 1")
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == checkpoint


def test_batch_that_does_not_split_over_the_processes_is_refused_once(tmp_path):
    result = torchrun(*SMALL[:-1], "15", "--steps", "3", "--out", str(tmp_path / "out"), timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("example_training.py:")]
    assert len(ours) == 1 and "--batch-size 15" in ours[0] and "2 processes" in ours[0], result.stderr
    assert not (tmp_path / "out").exists()


def test_more_processes_than_gpus_end_with_one_line(tmp_path):
    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has a GPU for each of the 2 processes")
    result = torchrun(*SMALL, "--device", "cuda", "--steps", "3", "--out", str(tmp_path / "out"), timeout=300)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("example_training.py:")]
    assert len(ours) == 1 and "--device cuda" in ours[0], result.stderr
    if torch.cuda.device_count() == 1:  # no GPU at all: "no CUDA GPU is available"
        assert "2 processes" in ours[0] and "1 GPU(s)" in ours[0], ours[0]
    assert not (tmp_path / "out").exists()


def test_a_failing_process_says_so_in_one_line_and_nothing_hangs(tmp_path):
    result = torchrun(*SMALL, "--steps", "100", "--out", str(tmp_path / "out"), timeout=300,
                      script=ROOT / "tests" / "failing_process.py")
    assert result.returncode != 0
    line = "example_training.py: error: process 1 of 2 failed: RuntimeError: the sixth batch failed\n"
    assert result.stderr.count(line) == 1 and "second line" not in result.stderr, result.stderr


def test_one_process_without_torchrun_is_not_distributed(tmp_path, monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    args = et.parse_args(SMALL + ["--steps", "2", "--out", str(tmp_path)])
    assert et.start_processes(args) == et.Ranks(0, 1) and not torch.distributed.is_initialized()
    result = et.train(args, et.Sorting(args.seq_len), log=False)
    assert type(result["model"]) is et.GPT


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
