"""Inference speed of a trained tracker: `muonreg.predict` end to end, and ONNX Runtime beside torch.

    python bench/inference_throughput.py --checkpoint best.pt --data DIR [--onnx model.onnx]
        [--split test] [--events 2400] [--batch 128] [--threads 1]

predict: the split's first `--events` events to HDF5, with the least-squares fit of the assigned hits
and without it (`--no-fit`). ONNX: the same batches (the split's events, `--batch` at a time, in order)
through the torch network and through ONNX Runtime (exported first unless `--onnx` names a file), one
intra-op thread each by default; events/s of the forward pass alone.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import header

from muonreg import export
from muonreg.data.dataset import MuonEventDataset, collate
from muonreg.data.format import DatasetReader
from muonreg.predict import predict
from muonreg.trained import load_model
from muonreg.training.setup import hit_features, run_splits


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--onnx", type=Path, help="an export of the checkpoint (default: export it now)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--events", type=int, default=2400)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    header(sys.argv)
    torch.set_num_threads(args.threads)
    model, cfg = load_model(args.checkpoint)
    reader = DatasetReader(args.data, required_track_features=())
    indices = run_splits(cfg, len(reader))[args.split][: args.events]
    n = len(indices)

    with tempfile.TemporaryDirectory() as tmp:
        for fit in ("robust", None):
            start = time.perf_counter()
            done = predict(model, cfg, args.data, Path(tmp) / "p.h5", split=args.split, batch_size=args.batch,
                           device="cpu", fit=fit, progress=False, limit=n)  # fmt: skip
            rate = done / (time.perf_counter() - start)
            print(f"predict ({'fit: ' + fit if fit else 'no fit'}): {done} events, {rate:.0f} events/s")

        features = hit_features(cfg, reader.hit_features, str(args.data))
        dataset = MuonEventDataset(reader, features, [], int(cfg.data.max_particles), indices=indices)
        batches = [
            collate([dataset[i] for i in range(s, min(s + args.batch, n))]) for s in range(0, n, args.batch)
        ]
        path = args.onnx or Path(tmp) / "model.onnx"
        if args.onnx is None:
            export.export_onnx(model, cfg, batches[0], path)
        session, wrapper = export.ort_session(path, args.threads), export.OnnxTracker(model)
        seconds = {"torch": 0.0, "onnxruntime": 0.0}
        worst = 0.0
        for batch in batches:
            start = time.perf_counter()
            with torch.no_grad():
                ref = wrapper(*(batch[k] for k in export.INPUTS))
            seconds["torch"] += time.perf_counter() - start
            start = time.perf_counter()
            got = session.run(list(export.OUTPUTS), {k: batch[k].numpy() for k in export.INPUTS})
            seconds["onnxruntime"] += time.perf_counter() - start
            worst = max(worst, float(np.abs(ref[0].numpy() - got[0]).max()))
        for name, s in seconds.items():
            print(f"forward {name}: {n} events in batches of {args.batch}, {n / s:.0f} events/s")
        print(f"largest |onnx - torch| validity logit: {worst:.2g}")


if __name__ == "__main__":
    main()
