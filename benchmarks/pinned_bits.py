"""Where two builds' deterministic outputs differ, on the cases that tests/test_cuda.py pins.

    python benchmarks/pinned_bits.py save old.pt              # with one build of the extension
    python benchmarks/pinned_bits.py save new.pt              # with another (another checkout)
    python benchmarks/pinned_bits.py compare old.pt new.pt    # per output: how many elements differ, where, by how much

`save` also says, per case, whether the outputs are those pinned in
tests/deterministic_sha256.json, and writes their SHA-256s beside the file (`<file>.sha256.json`,
in that file's format), for a change that alters the bits on purpose. `--device cpu` runs the
PyTorch reference instead of the kernels (to try the script without a GPU).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's flash_attention, then its tests
import flash_attention as fa  # noqa: E402
from test_cuda import PINNED, PINNED_HASHES, deterministic_outputs, sha256  # noqa: E402

NAMES = ("O", "L", "dQ", "dK", "dV")


def save(path: Path, device: str) -> None:
    if device == "cuda":
        print(f"kernels: {fa._extension().__file__}")  # loading them registers the ops' CUDA kernels
    pinned = json.loads(PINNED_HASHES.read_text())
    outputs, hashes = {}, {}
    for case in PINNED:
        key = "-".join(map(str, case))
        outputs[key] = [t.cpu() for t in deterministic_outputs(*case, device=device)]
        O, _, dQ, dK, dV = outputs[key]
        hashes[key] = [sha256(t) for t in (O, dQ, dK, dV)]  # the pinned outputs: all but L
        if key not in pinned:
            print(f"{key}: not pinned yet")
            continue
        differ = [name for name, a, b in zip(("O", "dQ", "dK", "dV"), hashes[key], pinned[key]) if a != b]
        print(f"{key}: " + (f"differs from the pinned bits in {', '.join(differ)}" if differ else "the pinned bits"))
    torch.save(outputs, path)
    path.with_suffix(".sha256.json").write_text(json.dumps(hashes, indent=1) + "\n")


def compare(a_path: Path, b_path: Path) -> None:
    a, b = torch.load(a_path), torch.load(b_path)
    for key in a:
        for name, x, y in zip(NAMES, a[key], b[key]):
            differ = x != y
            if not differ.any():
                print(f"{key} {name}: identical")
                continue
            rows = differ.reshape(*differ.shape[:3], -1).any(-1).nonzero()[:, 2].unique().tolist()
            print(f"{key} {name}: {int(differ.sum())} of {x.numel()} elements differ, max |difference| "
                  f"{float((x - y).abs().max()):.3g}, in {len(rows)} rows (first {rows[:8]}, last {rows[-3:]})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("save", help="run the pinned cases, save their outputs")
    s.add_argument("file", type=Path)
    s.add_argument("--device", default="cuda")
    c = sub.add_parser("compare", help="where two saved runs differ")
    c.add_argument("a", type=Path)
    c.add_argument("b", type=Path)
    args = parser.parse_args()
    if args.command == "save":
        save(args.file, args.device)
    else:
        compare(args.a, args.b)


if __name__ == "__main__":
    main()
