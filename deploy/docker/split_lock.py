"""Split requirements.lock for the CPU image: everything but the CUDA stack, with hashes,
and the torch/torchvision pins to take from the PyTorch CPU index instead.

    python split_lock.py requirements.lock cpu-requirements.txt torch-cpu.txt
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

CUDA_ONLY = re.compile(r"^(nvidia-[\w.-]+|cuda-[\w.-]+|triton)==")
TORCH = re.compile(r"^(torch|torchvision)==([\w.]+)")


def split(lock: str) -> tuple[str, list[str]]:
    blocks = re.split(r"\n(?=\S)", lock.strip())
    kept, torch = [], []
    for block in blocks:
        first = block.splitlines()[0]
        if match := TORCH.match(first):
            torch.append(f"{match[1]}=={match[2]}+cpu")
        elif not CUDA_ONLY.match(first):
            kept.append(block)
    return "\n".join(kept) + "\n", torch


def main(lock: Path, cpu_out: Path, torch_out: Path) -> int:
    kept, torch = split(lock.read_text())
    cpu_out.write_text(kept)
    torch_out.write_text("\n".join(torch) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])))
