"""text_seg CPU benchmarks (issue 5): MedSAM encoder time per 1024^2 image, and an adapter training
step with cached image embeddings against recomputed ones. MedSAM weights are random (the timing does
not depend on them). Results: docs/families/text_seg.md, "Benchmarks".

Usage: python bench/bench_text_seg.py
"""
import os
import tempfile
import time

import torch

import medfuse.families  # noqa: F401  (registers the families)
from medfuse.families.text_seg.task import TextSegTask


def main() -> None:
    torch.manual_seed(0)
    cache = tempfile.mkdtemp()
    # MedSAM image side (random weights), frozen, MiniLM, hierarchical
    task = TextSegTask({"model": {"name": "text_seg", "params": {"embedding_cache": cache}}})
    m = task.model
    task.train()
    B = 2
    batch = {"image": torch.rand(B, 3, 1024, 1024), "box": torch.tensor([[100., 120., 600., 700.]] * B),
             "text": ["BI-RADS 4 hypoechoic mass, irregular margins", "BI-RADS 3 oval mass, circumscribed margins"],
             "mask": (torch.rand(B, 1, 256, 256) > 0.95).float()}
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)
    def step():
        t = time.perf_counter()
        c = time.process_time()
        out = task.forward_batch(batch)
        loss = task.compute_loss(batch, out)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
        return time.perf_counter() - t, time.process_time() - c
    with torch.no_grad():
        x = m.image_side.normalise(batch["image"][:1])
        m.image_side.encoder(x)
        t = time.perf_counter()
        c = time.process_time()
        m.image_side.encoder(x)
        print(f"MedSAM encoder, one 1024^2 image: wall {time.perf_counter()-t:.2f} s, cpu {time.process_time()-c:.2f} s")
    print("recomputed (first epoch, cache miss): wall {:.2f} s cpu {:.2f} s".format(*step()))
    for _i in range(3):
        print("cached (later epochs): wall {:.3f} s cpu {:.3f} s".format(*step()))
    m.extractor = None
    object.__setattr__(m, "extractor", None)
    print("recomputed, no cache: wall {:.2f} s cpu {:.2f} s".format(*step()))
    print("load", os.getloadavg())


if __name__ == "__main__":
    main()
