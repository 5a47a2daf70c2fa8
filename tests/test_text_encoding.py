"""Every text file medfuse opens names its encoding (UTF-8): a process whose locale is not UTF-8
(a library that calls ``locale.setlocale``, a C-locale job) would otherwise read a manifest, a
report or a label file as ASCII and fail on a non-ASCII name (the fresh-clone CI once read
report.html as ASCII). ruff's ``PLW1514`` (a preview rule) finds an ``open``/``read_text`` without
one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"


def test_every_text_open_in_the_package_names_its_encoding():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--preview", "--select", "PLW1514",
                          "--no-cache", "--output-format", "concise", str(SRC)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
