"""Peak memory of reading CT-RATE-Thinking-style chain-of-thought JSON lines (``read_cot``).

The released ``vqa.jsonl`` is about 0.8 GB: the reader must stream it. This writes a synthetic file
of the same record shape (image, report, system_thinking, question, thinking, answer) and reports the
reader's extra peak RSS over the process after import, in a fresh process per measurement.

    python bench/bench_cot.py [--volumes 6000] [--questions 15]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

PROBE = """
import resource, sys, time
from pathlib import Path
from medfuse.families.ct_encoder.cot import read_cot
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.time()
out = read_cot(Path(sys.argv[1]))
print(len(out), time.time() - t, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
"""


def write(path: Path, volumes: int, questions: int) -> None:
    report = "A nodule in the left lung. " * 20
    trace = "Okay, the report says ... " * 80
    with path.open("w") as f:
        for v in range(volumes):
            image = f"CT-RATE/dataset/train/train_{v}/train_{v}_a/train_{v}_a_1.nii.gz"
            for _ in range(questions):
                f.write(json.dumps({"image": image, "report": report, "system_thinking": trace,
                                    "question": "Where is the nodule located?",
                                    "thinking": "Looking at the left lung there is a small nodule in the upper lobe.",
                                    "answer": "In the left upper lobe."}) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--volumes", type=int, default=6000)
    ap.add_argument("--questions", type=int, default=15)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "vqa.jsonl"
        write(path, args.volumes, args.questions)
        n, secs, mb = subprocess.run([sys.executable, "-c", PROBE, str(path)], capture_output=True, text=True,
                                     check=True).stdout.split()
        print(f"| {path.stat().st_size / 1e6:.0f} MB, {int(n)} volumes | {float(secs):.1f} s | {float(mb):.0f} MB |")


if __name__ == "__main__":
    main()
