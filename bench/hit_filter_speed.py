"""How fast the hit filter runs at pile-up 200 (~7 260 hits per event): training and inference events/s
in torch, inference in ONNX Runtime, and the peak memory, on real simulated pile-up events.

    python bench/hit_filter_speed.py [--checkpoint best.pt] [--events 64] [--batch 8] [--set model.dim=32 ...]

Without --checkpoint the filter of `+experiment=hit_filter` (with --set changes) is built untrained: its
speed does not depend on its weights. Events come from a pile-up dataset under bench/out (simulated once,
`--pileup`). Inference runs in batches of --batch events after one warm-up batch; training steps (forward,
backward, AdamW) in batches of trainer.batch_size. torch uses its default threads (the machine's cores),
ONNX Runtime as many. Timing excludes reading and preparing events (they are collated first).
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import OUT, header
from hydra import compose, initialize_config_dir

from muonreg.config import project_root, validate
from muonreg.data.dataset import MuonEventDataset, collate
from muonreg.data.format import DatasetReader, is_dataset
from muonreg.data.pileup import write_pileup_dataset
from muonreg.export import INPUTS, export_onnx, ort_session
from muonreg.trained import load_model
from muonreg.training.setup import build_model, hit_features


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pileup_events(events: int, pileup: float) -> Path:
    path = OUT / f"pileup{pileup:g}-{events}"
    if not is_dataset(path):
        write_pileup_dataset(path, events, seed=11, pileup=pileup, compression=None)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, help="a trained filter (default: the config's, untrained)")
    parser.add_argument("--events", type=int, default=64)
    parser.add_argument("--pileup", type=float, default=200.0)
    parser.add_argument("--batch", type=int, default=8, help="events per inference batch")
    parser.add_argument("--train-steps", type=int, default=4)
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE")
    args = parser.parse_args()
    header(sys.argv)
    reader = DatasetReader(pileup_events(args.events, args.pileup))
    if args.checkpoint:
        model, cfg = load_model(args.checkpoint, reader.hit_features, kind=None)
    else:
        with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
            cfg = compose(config_name="train", overrides=["+experiment=hit_filter", *args.set])
        validate(cfg)
        model = build_model(cfg, hit_features(cfg, reader.hit_features, "bench"))
    dataset = MuonEventDataset(reader, hit_features(cfg, reader.hit_features, "bench"), [], 4)
    batches = [
        collate([dataset[i] for i in range(start, min(start + args.batch, len(dataset)))])
        for start in range(0, len(dataset), args.batch)
    ]
    hits = float(np.mean(reader.num_hits()))
    print(f"events: {len(dataset)} at pile-up {args.pileup:g}, {hits:.0f} hits per event; model: "
          f"{sum(p.numel() for p in model.parameters())} parameters, torch threads {torch.get_num_threads()}")  # fmt: skip
    print(f"model: dim {cfg.model.dim}, layers {cfg.model.layers}, neighbours {cfg.model.neighbours}, "
          f"attention layers {cfg.model.attention_layers}, order {cfg.model.order}")  # fmt: skip

    model.eval()
    with torch.no_grad():
        model(batches[0])
        start = time.perf_counter()
        for batch in batches[1:]:
            model(batch)
    events = sum(len(b["event_index"]) for b in batches[1:])
    print(f"torch_inference_events_per_s: {events / (time.perf_counter() - start):.1f}")
    print(f"torch_inference_peak_mib: {peak_mib():.0f}")

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "filter.onnx"
        export_onnx(model, cfg, batches[0], path)
        session = ort_session(path, threads=torch.get_num_threads())
        feeds = [{k: b[k].numpy() for k in INPUTS} for b in batches]
        session.run(None, feeds[0])
        start = time.perf_counter()
        for feed in feeds[1:]:
            session.run(None, feed)
        print(f"onnxruntime_inference_events_per_s: {events / (time.perf_counter() - start):.1f}")

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    size = int(cfg.trainer.batch_size)
    steps = [
        collate([dataset[i % len(dataset)] for i in range(k * size, (k + 1) * size)])
        for k in range(args.train_steps + 1)
    ]
    for k, batch in enumerate(steps):
        if k == 1:
            start = time.perf_counter()
        loss = model.loss(model(batch), batch)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"train_events_per_s: {args.train_steps * size / (time.perf_counter() - start):.1f} (batch {size})")
    print(f"peak_mib: {peak_mib():.0f}")


if __name__ == "__main__":
    main()
