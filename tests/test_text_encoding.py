"""Every text file medfuse and its tests open names its encoding (UTF-8): a process whose locale is
not UTF-8 would otherwise read a manifest, a report or a label file as ASCII and fail on a non-ASCII
name. SimpleITK's GDCM DICOM writer (a test helper, tests/data/test_io.py) leaves the process in the
C locale, and the fresh-clone CI then read report.html as ASCII in a later test. ruff's ``PLW1514``
(a preview rule) finds an ``open``/``read_text``/``write_text`` without one."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_text_open_names_its_encoding():
    out = subprocess.run([sys.executable, "-m", "ruff", "check", "--preview", "--select", "PLW1514",
                          "--no-cache", "--output-format", "concise", str(ROOT / "src"), str(ROOT / "tests")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
