"""Train a small transformer whose attention is this project's FlashAttention.

    python example_training.py                          # the built-in task, on the GPU if there is one
    python example_training.py --attention sdpa         # the same model with PyTorch's attention
    python example_training.py --check-reproducible     # train twice; are the parameters bit-identical?
    python example_training.py --data notes.txt         # a character model of any text file
    python example_training.py --steps 400 --resume     # go on from the last checkpoint
    torchrun --standalone --nproc_per_node=2 example_training.py   # 2 processes (GPUs), DistributedDataParallel

What it writes, all in --out (default runs/example): checkpoint.pt (every --ckpt-every steps
and at the end), loss_curve.csv and loss_curve.png (matplotlib, installed by ./install.sh)
at the end; --check-reproducible writes its two runs' checkpoints in --out/reproducible_1 and
--out/reproducible_2.

The built-in task is sorting: the model reads n random symbols (0..15) and a separator,
then must write the same n symbols in ascending order. Each output must find, among all
the inputs, the next symbol in order and how often it occurs: the information is at other
positions, so no network that works on each position alone can solve it; attention must.
Success: the share of fresh sequences sorted without a single mistake (the target is 99%).

On the CPU the attention runs the PyTorch reference of the same tiled algorithm
(flash_attention.py), slowly; the CPU defaults are a smaller model and shorter sequences.

Under torchrun, each process trains a copy of the model with DistributedDataParallel (NCCL
on GPUs, one process per GPU; gloo on CPUs). --batch-size is global: every process draws the
batch a single process would (from the seed and the step alone) and trains on its own slice
of it, so N processes see the data of one. Only the first process (rank 0) prints and writes.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import hashlib
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from flash_attention import HEAD_DIM, FlashAttention

# --------------------------------------------------------------------------- settings
# Defaults on the GPU and (after the slash) on the CPU; every one is a command-line option.
GPU_DEFAULTS = dict(n_layer=4, n_embd=256, seq_len=32, batch_size=64, steps=3000, lr=1e-3)
CPU_DEFAULTS = dict(n_layer=2, n_embd=128, seq_len=16, batch_size=32, steps=1500, lr=2e-3)
VOCAB = 16  # symbols 0..15 of the sorting task; the separator is symbol 16
TARGET_ACCURACY = 0.99  # share of sequences sorted without a mistake
EVAL_EVERY = 50  # steps between evaluations (and points of the loss curve)
MAX_LEN = 2048  # the longest sequence the position embedding takes
# Under torchrun: how long a process waits for the others in a collective before it gives up
# with an error (instead of hanging when another process died). The first CUDA call may
# compile the kernels for minutes, hence the margin.
PROCESS_GROUP_TIMEOUT = datetime.timedelta(minutes=10)
# Under torchrun every process meets the same usage error, and the launcher stops them all
# as soon as one exits. The others give process 0 this long to report it first; a process
# still running after it (one whose process 0 did not fail) reports the error itself.
USAGE_ERROR_GRACE_S = 60


# --------------------------------------------------------------------------- the model (nanoGPT-style)

@dataclass
class Config:
    vocab_size: int
    block_size: int  # longest sequence
    n_layer: int
    n_embd: int
    attention: str = "flash"  # flash | sdpa | naive
    deterministic: bool = False

    @property
    def n_head(self) -> int:
        return self.n_embd // HEAD_DIM


class SDPAttention(nn.Module):
    """PyTorch's scaled_dot_product_attention, causal (it picks its own backend)."""

    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


class NaiveAttention(nn.Module):
    """softmax(q k^T / sqrt(64)) v, causal, the plain way: it materializes the (T, T) scores."""

    def forward(self, q, k, v):
        T = q.shape[-2]
        att = (q @ k.transpose(-1, -2)) / math.sqrt(HEAD_DIM)
        att = att.masked_fill(torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1), -math.inf)
        return torch.softmax(att, dim=-1) @ v


def make_attention(cfg: Config) -> nn.Module:
    """The attention the model uses, (q, k, v) -> y, all (B, nh, T, 64); none has parameters."""
    if cfg.attention == "flash":
        return FlashAttention(head_dim=HEAD_DIM, causal=True, deterministic=cfg.deterministic)
    return SDPAttention() if cfg.attention == "sdpa" else NaiveAttention()


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: learned Q/K/V and output projections around the attention."""

    def __init__(self, cfg: Config):
        super().__init__()
        self.n_head = cfg.n_head
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.attention = make_attention(cfg)

    def forward(self, x):  # x: (B, T, C)
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, HEAD_DIM).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, 64)
        y = self.attention(q, k, v)
        return self.proj(y.transpose(1, 2).reshape(B, T, C))


class Block(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd)
        self.mlp = nn.Sequential(nn.Linear(cfg.n_embd, 4 * cfg.n_embd), nn.GELU(), nn.Linear(4 * cfg.n_embd, cfg.n_embd))

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT(nn.Module):
    def __init__(self, cfg: Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, idx):  # idx: (B, T) token ids -> logits (B, T, vocab)
        pos = torch.arange(idx.shape[1], device=idx.device)
        x = self.wte(idx) + self.wpe(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


# --------------------------------------------------------------------------- data

class Sorting:
    """[x_1 .. x_n, SEP, sorted(x)]: the loss and the accuracy count the sorted half only."""

    def __init__(self, n: int):
        self.n = n
        self.vocab_size = VOCAB + 1
        self.block_size = 2 * n + 1

    def batch(self, batch_size, generator, device):
        x = torch.randint(0, VOCAB, (batch_size, self.n), generator=generator)
        sep = torch.full((batch_size, 1), VOCAB)
        seq = torch.cat([x, sep, x.sort(dim=1).values], dim=1).to(device)
        inputs, targets = seq[:, :-1], seq[:, 1:].clone()
        targets[:, : self.n - 1] = -1  # the first half is random: nothing to learn there
        return inputs, targets

    @staticmethod
    def accuracy(logits, targets):
        """Share of sequences whose sorted half is right in every position."""
        counted = targets >= 0
        right = (logits.argmax(-1) == targets) | ~counted
        return right.all(dim=1).float().mean().item()


class CharText:
    """Random windows of a text file, one character a token; accuracy is next-character accuracy."""

    def __init__(self, path: Path, seq_len: int):
        text = path.read_text(encoding="utf-8", errors="replace")
        chars = sorted(set(text))
        self.stoi = {c: i for i, c in enumerate(chars)}
        self.data = torch.tensor([self.stoi[c] for c in text], dtype=torch.long)
        if len(self.data) < seq_len + 2:
            raise UsageError(f"--data {path} has {len(self.data)} characters; --seq-len {seq_len} needs at least "
                             f"{seq_len + 2}")
        self.n = seq_len
        self.vocab_size = len(chars)
        self.block_size = seq_len

    def batch(self, batch_size, generator, device):
        start = torch.randint(0, len(self.data) - self.n - 1, (batch_size,), generator=generator)
        windows = torch.stack([self.data[s : s + self.n + 1] for s in start.tolist()]).to(device)
        return windows[:, :-1], windows[:, 1:]

    @staticmethod
    def accuracy(logits, targets):
        return (logits.argmax(-1) == targets).float().mean().item()


def batch_generator(seed: int, step: int) -> torch.Generator:
    """The data of step `step` depends on (seed, step) alone: a resumed run sees the same batches."""
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


# --------------------------------------------------------------------------- several processes (torchrun)

class UsageError(ValueError):
    """A mistake in the command line: main() prints it as one line and exits 2."""


@dataclass
class Ranks:
    """This process among the training processes; without torchrun, process 0 of 1."""

    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def one_line(e: Exception) -> str:
    """The exception's type and the first line of its message."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def main_process() -> bool:
    """Whether this process prints (and writes): the only one, or torchrun's rank 0."""
    return os.environ.get("RANK", "0") == "0"


def start_processes(args) -> Ranks:
    """Under torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK): take GPU LOCAL_RANK (--device cuda)
    and join the other processes, NCCL on GPUs and gloo on CPUs. Without torchrun: do nothing."""
    if "RANK" not in os.environ:
        return Ranks()
    ranks = Ranks(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]))
    if args.batch_size % ranks.world:
        raise UsageError(f"--batch-size {args.batch_size} is the global batch: it must split evenly over the "
                         f"{ranks.world} processes")
    if args.device == "cuda":
        per_node, gpus = int(os.environ["LOCAL_WORLD_SIZE"]), torch.cuda.device_count()
        if per_node > gpus:
            raise UsageError(f"--device cuda: {per_node} processes on this machine (torchrun --nproc_per_node) "
                             f"but {gpus} GPU(s); start at most one process per GPU, or use --device cpu")
        args.device = f"cuda:{os.environ['LOCAL_RANK']}"
        torch.cuda.set_device(args.device)
    dist.init_process_group("nccl" if args.device.startswith("cuda") else "gloo", timeout=PROCESS_GROUP_TIMEOUT)
    return ranks


def parameters_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bits, in order: equal digests, bit-identical parameters."""
    h = hashlib.sha256()
    for t in model.state_dict().values():
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------- training


# The options that decide the model's parameters: a checkpoint resumes only with the same ones.
MODEL_OPTIONS = ("data", "seq_len", "n_layer", "n_embd")


def load_checkpoint(args, device, ranks: Ranks):
    """The checkpoint in args.out for --resume, after checking that this run can go on from it."""
    path = args.out / "checkpoint.pt"
    if not path.is_file():
        raise UsageError(f"--resume: no checkpoint at {path} (train once without --resume to make one)")
    try:
        ckpt = torch.load(path, map_location=device)
    except Exception as e:  # a truncated or foreign file: say so in one line
        raise UsageError(f"--resume: the checkpoint at {path} cannot be read ({one_line(e)})") from e
    if not isinstance(ckpt, dict) or "options" not in ckpt:
        raise UsageError(f"--resume: {path} is not a checkpoint of this version of example_training.py "
                         f"(it does not record the options it was trained with); train anew without --resume")
    for name in MODEL_OPTIONS:
        saved, asked = ckpt["options"][name], str(getattr(args, name))
        if saved != asked:
            option = "--" + name.replace("_", "-")
            said = {value: value if value != "None" else "none (the sorting task)" for value in (saved, asked)}
            raise UsageError(f"--resume: the checkpoint at {path} was trained with {option} {said[saved]}, this run "
                             f"asks for {option} {said[asked]}; resume with the options the checkpoint was trained "
                             f"with ({', '.join('--' + n.replace('_', '-') for n in MODEL_OPTIONS)})")
    if ckpt["world_size"] != ranks.world:
        raise UsageError(f"--resume: the checkpoint at {path} was trained by {ckpt['world_size']} process(es), this "
                         f"run has {ranks.world}; resume with the same number (torchrun --nproc_per_node), which "
                         f"decides how each batch is split and so the bits")
    if ckpt["step"] >= args.steps:
        raise UsageError(f"--resume: --steps {args.steps} is not above the checkpoint's step {ckpt['step']} "
                         f"(at {path}); ask for more steps to go on training")
    return ckpt


def learning_rate(step: int, args) -> float:
    """Linear warm-up over the first 5% of the steps, then cosine decay to a tenth (as nanoGPT)."""
    warmup = max(1, args.steps // 20)
    if step < warmup:
        return args.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, args.steps - warmup)
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def train_step(model, optimizer, inputs, targets, lr: float) -> torch.Tensor:
    """One AdamW step on the cross-entropy of the next tokens (targets of -1 are not counted). Returns the loss."""
    logits = model(inputs)
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    return loss


def make_reproducible(deterministic: bool) -> None:
    """What PyTorch needs, beyond deterministic=True for the attention, for bit-identical training:
    deterministic algorithms everywhere (the embedding's backward otherwise adds with atomics),
    and a fixed cuBLAS workspace (CUBLAS_WORKSPACE_CONFIG, which must be set before cuBLAS starts).
    warn_only: an op with no deterministic version (PyTorch's memory-efficient attention backward,
    with --attention sdpa) warns instead of stopping the run, and --check-reproducible reports the
    result as it is."""
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def train(args, task, log=True, ranks: Ranks = Ranks()):
    """Trains from args.seed (or from the checkpoint in args.out with --resume). Returns a summary dict.

    With several processes, each trains on its slice of every batch through
    DistributedDataParallel, and only process 0 logs and writes checkpoints."""
    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    cfg = Config(task.vocab_size, task.block_size, args.n_layer, args.n_embd, args.attention, args.deterministic)
    model = GPT(cfg).to(device)
    # Several processes: the wrapper averages the gradients over them in backward.
    step_model = DistributedDataParallel(model) if ranks.world > 1 else model
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    ckpt_path = args.out / "checkpoint.pt"
    step, curve, reached = 0, [], None
    if args.resume:
        ckpt = load_checkpoint(args, device, ranks)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        step, curve, reached = ckpt["step"], ckpt["curve"], ckpt["reached"]
    eval_inputs, eval_targets = task.batch(256, torch.Generator().manual_seed(args.seed + 7), device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start, trained_from = time.perf_counter(), step
    bar = tqdm(total=args.steps, initial=step, desc=f"train ({args.attention})", disable=not (log and ranks.main),
               file=sys.stderr)
    loss = torch.tensor(float("nan"))
    share = args.batch_size // ranks.world  # this process's rows of each batch
    while step < args.steps:
        inputs, targets = task.batch(args.batch_size, batch_generator(args.seed, step), device)
        if ranks.world > 1:
            mine = slice(ranks.rank * share, (ranks.rank + 1) * share)
            inputs, targets = inputs[mine], targets[mine]
        loss = train_step(step_model, optimizer, inputs, targets, learning_rate(step, args))
        step += 1
        if step % EVAL_EVERY == 0 or step == args.steps:
            if ranks.world > 1:  # the loss of the whole batch: the mean of the equal slices' losses
                loss = loss.detach().clone()
                dist.all_reduce(loss)
                loss /= ranks.world
            with torch.no_grad():
                acc = task.accuracy(model(eval_inputs), eval_targets)
            elapsed = time.perf_counter() - start
            curve.append((step, loss.item(), acc, elapsed))
            if reached is None and isinstance(task, Sorting) and acc >= TARGET_ACCURACY:
                reached = (step, elapsed)
            bar.set_postfix(loss=f"{loss.item():.4f}", acc=f"{acc:.3f}",
                            steps_per_s=f"{(step - trained_from) / elapsed:.1f}")
        if ranks.main and (step % args.ckpt_every == 0 or step == args.steps):
            args.out.mkdir(parents=True, exist_ok=True)
            torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict(), "step": step,
                        "curve": curve, "reached": reached, "world_size": ranks.world,
                        "options": {name: str(getattr(args, name)) for name in MODEL_OPTIONS}}, ckpt_path)
        bar.update()
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - start
    with torch.no_grad():
        final_acc = task.accuracy(model(eval_inputs), eval_targets)
    return {
        "model": model,
        "final_loss": loss.item(),
        "accuracy": final_acc,
        "steps_per_s": (step - trained_from) / elapsed if step > trained_from else float("nan"),
        "peak_mib": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None,
        "reached": reached,
        "curve": curve,
    }


def save_curve(curve, out: Path) -> list[Path]:
    """The loss curve as CSV, and as PNG when matplotlib is installed."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "loss_curve.csv"]
    with open(paths[0], "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["step", "loss", "accuracy", "seconds"])
        writer.writerows(curve)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return paths
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([c[0] for c in curve], [c[1] for c in curve])
    ax.set(xlabel="step", ylabel="training loss", yscale="log", title="example_training.py")
    fig.tight_layout()
    fig.savefig(out / "loss_curve.png")
    plt.close(fig)
    return paths + [out / "loss_curve.png"]


# --------------------------------------------------------------------------- command line

class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage block and no traceback; once under torchrun
        raise UsageError(message)


def unusable_directory(out: Path) -> str | None:
    """Why --out cannot hold the run's files, or None. Looks only: creates nothing."""
    if out.exists():
        if not out.is_dir():
            return "exists and is not a directory"
        return None if os.access(out, os.W_OK | os.X_OK) else "is a directory this user cannot write to"
    parent = out.parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        return f"cannot be made: {parent} is a file, not a directory"
    return None if os.access(parent, os.W_OK | os.X_OK) else f"cannot be made: this user cannot write to {parent}"


def make_parser() -> Parser:
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--attention", choices=["flash", "sdpa", "naive"], default="flash",
                   help="the model's attention: this project's (flash) or PyTorch's (sdpa, naive)")
    p.add_argument("--deterministic", action="store_true", help="bit-reproducible training (see --check-reproducible)")
    p.add_argument("--check-reproducible", action="store_true",
                   help="train twice from one seed in deterministic mode; report whether every parameter is "
                        "bit-identical (under torchrun: on every process, and equal across processes)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where to train (default: cuda if a GPU is found, else cpu; the CPU runs a smaller model)")
    p.add_argument("--data", type=Path, help="train a character model on this text file instead")
    p.add_argument("--steps", type=int, help="training steps (GPU 3000, CPU 1500)")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the initial parameters and of every batch (default 0)")
    p.add_argument("--batch-size", type=int,
                   help="sequences per step, over all processes under torchrun: each trains on its equal share "
                        "(GPU 64, CPU 32)")
    p.add_argument("--seq-len", type=int, help="symbols to sort (GPU 32, CPU 16), or the context of --data")
    p.add_argument("--n-layer", type=int, help="transformer blocks (GPU 4, CPU 2)")
    p.add_argument("--n-embd", type=int, help="model width, a multiple of 64 (GPU 256, CPU 128)")
    p.add_argument("--lr", type=float, help="AdamW learning rate (GPU 1e-3, CPU 2e-3)")
    p.add_argument("--out", type=Path, default=Path("runs/example"),
                   help="directory for checkpoint.pt, loss_curve.csv and loss_curve.png (default runs/example)")
    p.add_argument("--ckpt-every", type=int, default=100, help="steps between checkpoints (default 100)")
    p.add_argument("--resume", action="store_true", help="go on from the checkpoint in --out")
    return p


def parse_args(argv=None):
    p = make_parser()
    args = p.parse_args(argv)

    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: no CUDA GPU is available (use --device cpu)")
    for name, value in (GPU_DEFAULTS if args.device == "cuda" else CPU_DEFAULTS).items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.data is not None and args.data.is_dir():
        p.error(f"--data {args.data} is a directory; give a text file")
    if args.data is not None and not args.data.is_file():
        p.error(f"--data {args.data}: no such file")
    why = unusable_directory(args.out)
    if why:
        p.error(f"--out {args.out} {why}; give a directory that exists or can be made")
    for name in ("steps", "batch_size", "n_layer", "ckpt_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.n_embd < HEAD_DIM or args.n_embd % HEAD_DIM:
        p.error(f"--n-embd must be a positive multiple of {HEAD_DIM} (the head size), got {args.n_embd}")
    longest = args.seq_len if args.data else 2 * args.seq_len + 1
    if args.seq_len < (1 if args.data else 2) or longest > MAX_LEN:
        p.error(f"--seq-len {args.seq_len} is out of range: the model takes sequences of at most {MAX_LEN} tokens "
                f"({'--seq-len' if args.data else '2 * --seq-len + 1'} <= {MAX_LEN}), and at least "
                f"{'1' if args.data else '2'} for --seq-len")
    if args.lr <= 0 or not math.isfinite(args.lr):
        p.error(f"--lr must be a positive number, got {args.lr}")
    if args.check_reproducible:
        args.deterministic = True
    return args


def main(argv=None):
    ranks = None
    try:
        args = parse_args(argv)
        ranks = start_processes(args)
        return run(args, ranks)
    except UsageError as e:
        if not main_process():
            time.sleep(USAGE_ERROR_GRACE_S)
        print(f"example_training.py: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if ranks is None or ranks.world == 1:
            raise  # one process: the whole traceback, as any script
        print(f"example_training.py: error: process {ranks.rank} of {ranks.world} failed: {one_line(e)}",
              file=sys.stderr)
        return 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run(args, ranks: Ranks = Ranks()):
    make_reproducible(args.deterministic)
    task = CharText(args.data, args.seq_len) if args.data else Sorting(args.seq_len)
    say = print if ranks.main else (lambda *a, **k: None)
    what = f"character model of {args.data}" if args.data else f"sorting {args.seq_len} symbols"
    processes = f", {ranks.world} processes" if ranks.world > 1 else ""
    say(f"Task: {what}. Model: {args.n_layer} blocks, width {args.n_embd} ({args.n_embd // HEAD_DIM} heads), "
        f"attention={args.attention}, deterministic={args.deterministic}, device={args.device}{processes}.")

    if args.check_reproducible:
        runs = []
        for n in (1, 2):
            say(f"Run {n} of 2 from seed {args.seed}...")
            run_args = argparse.Namespace(**{**vars(args), "resume": False, "out": args.out / f"reproducible_{n}"})
            runs.append(train(run_args, task, ranks=ranks)["model"])
        first, second = (m.state_dict() for m in runs)
        same = all(torch.equal(first[name], second[name]) for name in first)
        verdict = f"{len(first)} parameter tensors {'all bit-identical' if same else 'differ'} after {args.steps} steps"
        if ranks.world > 1:  # and every process must hold the same parameters as process 0
            views = [None] * ranks.world
            dist.all_gather_object(views, (same, parameters_digest(runs[1])))
            same = all(ok for ok, _ in views) and len({digest for _, digest in views}) == 1
            verdict += f", {'and equal' if same else 'or unequal'} on all {ranks.world} processes"
        say(f"Reproducible: {'yes' if same else 'NO'}: {verdict}.")
        return 0 if same else 1

    result = train(args, task, ranks=ranks)
    if not ranks.main:
        return 0
    paths = save_curve(result["curve"], args.out)
    print(f"Final loss {result['final_loss']:.4f}, accuracy {result['accuracy']:.3f} "
          f"({'sequences sorted without a mistake' if not args.data else 'next character'}), "
          f"{result['steps_per_s']:.1f} steps/s" +
          (f", peak GPU memory {result['peak_mib']:.0f} MiB." if result["peak_mib"] is not None else "."))
    if not args.data:
        if result["reached"]:
            step, seconds = result["reached"]
            print(f"Target accuracy {TARGET_ACCURACY:.0%} reached at step {step}, after {seconds:.1f} s.")
        else:
            print(f"Target accuracy {TARGET_ACCURACY:.0%} not reached in {args.steps} steps.")
    print("Loss curve: " + ", ".join(str(p) for p in paths))
    return 0


if __name__ == "__main__":
    status = main()
    if "RANK" in os.environ:
        # Under torchrun, leave without the interpreter's shutdown: gloo's worker threads
        # outlive destroy_process_group() and may still be releasing the last collective's
        # tensors, whose Python objects they cannot free once shutdown has begun; the
        # process then aborts ("terminate called without an active exception"; PyTorch 2.13
        # on CPUs, about one exit in five of `--check-reproducible` with two processes).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)
