"""Assemble BENCHMARKS.md from the sections the benchmark scripts wrote to benchmarks/results/."""

from __future__ import annotations

import sys
from pathlib import Path

from benchmarks.common import git_revision, machine

ORDER = ["etl.md", "loader.md", "infer.md", "scale.md", "gpu.md", "gpu_training.md"]


def main(results: Path = Path("benchmarks/results")) -> None:
    sections = [results / name for name in ORDER if (results / name).exists()]
    sections += sorted(p for p in results.glob("*.md") if p.name not in ORDER)
    out = [
        "# Benchmarks",
        "",
        "Written by `make bench` (CPU, side by side against a baseline in the same script; "
        "this machine is shared and noisy, so only the ratios mean much) and `make bench-gpu` "
        "(on a CUDA machine, when one is available); each section names its command and "
        f"machine. Assembled on {machine()} at commit {git_revision()}.",
        "",
    ]
    for path in sections:
        out += [path.read_text().rstrip(), ""]
    if not (results / "gpu.md").exists():
        out += [
            "## GPU (`make bench-gpu`)",
            "",
            "Not measured yet: no CUDA machine has run `make bench-gpu` "
            "(`python -m benchmarks.bench_gpu`; training patches/s and data wait with "
            "decode on CPU vs GPU, and whole-slide time for a 100k x 100k slide).",
            "",
        ]
    sys.stdout.write("\n".join(out))


if __name__ == "__main__":
    main()
