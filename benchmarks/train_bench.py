"""Training benchmark: example_training.py's model trained with each attention, side by side, in one run.

    python benchmarks/train_bench.py                          # configs default and long, every attention
    python benchmarks/train_bench.py --config gpt2small       # GPT-2 small's shape (report only)
    python benchmarks/train_bench.py --device cpu --config tiny --warmup 1 --windows 2 --window 2   # smoke run

Configs: default (the example's GPU defaults: sorting, 4 blocks of width 256, batch 64),
long (a character model of USAGE.md, 4 blocks of width 256, sequences of 4096, batch 4:
attention dominates the step), gpt2small (12 blocks of width 768, sequences of 1024,
batch 8) and tiny (for smoke runs). Attentions: flash (this project, default mode),
flash_det (deterministic=True, under torch.use_deterministic_algorithms), sdpa (PyTorch's
scaled_dot_product_attention, its own choice of backend) and naive (matmul-softmax-matmul).

For each (config, attention) the model starts from one seed and trains on the same batches
(example_training.py's: each step's batch from the seed and the step alone), with its
train_step, at a constant learning rate. A config's attentions train side by side: each
model is built and warmed up, then the timed windows take the attentions in turn (window w
of each, then window w + 1), so that a host whose speed drifts during the run (the GPU
machine's does, by 10-30%) slows them alike. It measures:
- steps_per_s: the median over --windows timed windows of --window steps, after --warmup
  steps, the GPU synchronized at each window's edges;
- peak_mib: peak GPU memory of the attention's training, above what was allocated before
  its model (the other attentions' models, alive beside it, are not counted);
- final_loss: the training loss of the last step;
- copy_kernels, cat_kernels (GPU): the copy kernels (and memcpys) and the cat kernels that
  one training step launches, counted with torch.profiler after the timed windows: the
  price of the layouts the attention hands autograd.
It prints a markdown table and writes one JSON line per row (config, impl, steps_per_s,
peak_mib, final_loss, gpu, date, ...) to --out.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import example_training as et  # noqa: E402

CONFIGS = {
    "default": dict(data=None, **{k: et.GPU_DEFAULTS[k] for k in ("seq_len", "n_layer", "n_embd", "batch_size")}),
    "long": dict(data=ROOT / "USAGE.md", seq_len=4096, n_layer=4, n_embd=256, batch_size=4),
    "gpt2small": dict(data=ROOT / "USAGE.md", seq_len=1024, n_layer=12, n_embd=768, batch_size=8),
    "tiny": dict(data=None, seq_len=8, n_layer=1, n_embd=64, batch_size=8),
}
IMPLS = ("flash", "flash_det", "sdpa", "naive")
SEED = 0
LR = et.GPU_DEFAULTS["lr"]


class Training:
    """One attention's model in one config: built from SEED, trained by windows of steps."""

    def __init__(self, config: str, impl: str, device: torch.device):
        c = CONFIGS[config]
        self.config, self.impl, self.device, self.batch_size = config, impl, device, c["batch_size"]
        self.task = et.CharText(c["data"], c["seq_len"]) if c["data"] else et.Sorting(c["seq_len"])
        self.deterministic = impl == "flash_det"
        self.settings = {k: str(v) if k == "data" else v for k, v in c.items()}
        self.rates: list[float] = []
        self.peak_bytes = 0  # above what was allocated before the model
        self.persistent_bytes = 0  # parameters and optimizer state, after the warm-up
        self.loss = None
        cfg = et.Config(self.task.vocab_size, self.task.block_size, c["n_layer"], c["n_embd"],
                        "flash" if self.deterministic else impl, self.deterministic)
        with self.memory_watch(new=True):
            torch.manual_seed(SEED)
            self.model = et.GPT(cfg).to(device)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.0)

    @contextlib.contextmanager
    def memory_watch(self, new: bool = False):
        """Raises peak_bytes to this block's peak; new: what the block leaves allocated is the
        model's (parameters, gradients, optimizer state)."""
        cuda = self.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize(self.device)
            before = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
        yield
        if cuda:
            torch.cuda.synchronize(self.device)
            base = before - self.persistent_bytes  # what was allocated before the model
            self.peak_bytes = max(self.peak_bytes, torch.cuda.max_memory_allocated(self.device) - base)
            if new:
                self.persistent_bytes += torch.cuda.memory_allocated(self.device) - before

    def steps(self, first: int, count: int) -> None:
        torch.use_deterministic_algorithms(self.deterministic, warn_only=True)
        for step in range(first, first + count):
            inputs, targets = self.task.batch(self.batch_size, et.batch_generator(SEED, step), self.device)
            self.loss = et.train_step(self.model, self.optimizer, inputs, targets, LR)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def warm_up(self, count: int) -> None:
        with self.memory_watch(new=True):  # the optimizer's state appears at the first step
            self.steps(0, count)

    def timed_window(self, first: int, count: int) -> None:
        with self.memory_watch():
            start = time.perf_counter()
            self.steps(first, count)
            self.rates.append(count / (time.perf_counter() - start))

    def row(self, steps: int) -> dict:
        """The measurements after `steps` steps; on the GPU, one more step is profiled."""
        cuda = self.device.type == "cuda"
        final_loss = self.loss.item()
        copies, cats = count_copy_kernels(lambda: self.steps(steps, 1)) if cuda else (None, None)
        return dict(config=self.config, impl=self.impl, steps_per_s=statistics.median(self.rates),
                    peak_mib=self.peak_bytes / 2**20 if cuda else None, final_loss=final_loss,
                    copy_kernels=copies, cat_kernels=cats, steps=steps, **self.settings)


def measure(config: str, impls: list[str], device: torch.device, warmup: int, windows: int, window: int,
            bar: tqdm) -> list[dict]:
    """A row per attention of one config: the models warm up one by one, then take turns by windows."""
    trainings = []
    for impl in impls:
        bar.set_postfix_str(f"{config} {impl} warm-up")
        training = Training(config, impl, device)
        training.warm_up(warmup)
        trainings.append(training)
        bar.update()
    for w in range(windows):
        for training in trainings:
            bar.set_postfix_str(f"{config} window {w + 1}/{windows} {training.impl}")
            training.timed_window(warmup + w * window, window)
            bar.update()
    return [training.row(warmup + windows * window) for training in trainings]


def count_copy_kernels(step) -> tuple[int, int]:
    """(copy kernels and memcpys, cat kernels) on the GPU during step()."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        step()
    names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    cats = sum("CatArray" in n for n in names)
    copies = sum(("copy" in n.lower() or "memcpy" in n.lower()) and "CatArray" not in n for n in names)
    return copies, cats


def table(rows: list[dict]) -> str:
    lines = ["| config | attention | steps/s | vs sdpa | peak MiB | final loss | copies, cats per step |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        sdpa = next((s for s in rows if s["config"] == r["config"] and s["impl"] == "sdpa"), None)
        ratio = f"{r['steps_per_s'] / sdpa['steps_per_s']:.2f}" if sdpa else "-"
        peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "-"
        kernels = f"{r['copy_kernels']}, {r['cat_kernels']}" if r["copy_kernels"] is not None else "-"
        lines.append(f"| {r['config']} | {r['impl']} | {r['steps_per_s']:.1f} | {ratio} | {peak} | "
                     f"{r['final_loss']:.4f} | {kernels} |")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", choices=sorted(CONFIGS),
                        help="configurations (default: default and long)")
    parser.add_argument("--impl", action="append", choices=IMPLS, help="attentions (default: all)")
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--warmup", type=int, default=20, help="untimed steps first (default 20)")
    parser.add_argument("--windows", type=int, default=9, help="timed windows (default 9)")
    parser.add_argument("--window", type=int, default=20, help="steps in a timed window (default 20)")
    parser.add_argument("--out", type=Path, help="JSON lines (default: benchmarks/results/<gpu>_<date>_trainer.jsonl)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA GPU is available (use --device cpu)")
    for name in ("warmup", "windows", "window"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be at least {0 if name == 'warmup' else 1}, got {getattr(args, name)}")

    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # before cuBLAS starts; flash_det needs it
    device = torch.device(args.device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    date = datetime.date.today().isoformat()
    out = args.out or ROOT / "benchmarks" / "results" / f"{gpu.replace(' ', '_')}_{date}_trainer.jsonl"
    configs, impls = args.config or ["default", "long"], args.impl or list(IMPLS)
    rows = []
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("")  # rows are appended config by config: a run cut short keeps them
    with tqdm(total=len(configs) * len(impls) * (1 + args.windows), desc="train_bench", unit="window",
              file=sys.stderr) as bar:
        for config in configs:
            group = measure(config, impls, device, args.warmup, args.windows, args.window, bar)
            for row in group:
                row.update(gpu=gpu, date=date, torch=torch.__version__)
            rows += group
            with out.open("a") as f:
                f.writelines(json.dumps(row) + "\n" for row in group)
    torch.use_deterministic_algorithms(False)
    print(f"\n{gpu}, PyTorch {torch.__version__}, {date}, FP32; median steps/s of {args.windows} windows of "
          f"{args.window} steps after {args.warmup}. JSON lines: {out}\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
