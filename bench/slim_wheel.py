"""Rewrite a wheel without the members whose names match a pattern (and without their RECORD lines).

    python bench/slim_wheel.py dist/pkg-1.0-py3-none-any.whl 'pkg/lib_(old|other)\\.so'

bench/gpu_check.sh uses it to carry bitsandbytes to a GPU machine with no network: its wheel holds one library
per CUDA and ROCm version (43 MB), and the machine needs one.
"""

from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path


def slim_wheel(wheel: Path, pattern: str) -> list[str]:
    """Drop matching members in place; returns their names."""
    drop = re.compile(pattern)
    tmp = wheel.with_suffix(".slim")
    dropped = []
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if drop.fullmatch(info.filename):
                dropped.append(info.filename)
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                lines = data.decode().splitlines(keepends=True)
                data = "".join(line for line in lines if not drop.fullmatch(line.split(",", 1)[0])).encode()
            dst.writestr(info, data)
    tmp.replace(wheel)
    return dropped


if __name__ == "__main__":
    wheel, pattern = Path(sys.argv[1]), sys.argv[2]
    dropped = slim_wheel(wheel, pattern)
    print(f"{wheel.name}: dropped {len(dropped)} members, now {wheel.stat().st_size / 2**20:.1f} MiB")
