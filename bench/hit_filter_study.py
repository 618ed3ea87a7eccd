"""The hit filter's ingredients, one at a time: train filter variants (arms) x seeds on simulated
pile-up-200 events (`+experiment=hit_filter`), set each one's working-point cuts on its validation
split, and measure it on a held-out pile-up set simulated with another seed and another detector
(chamber alignment) that no training or choice saw, beside the classical road search on the same
hits. Per arm: mean and 95 % Student-t interval over the seeds.

    python bench/hit_filter_study.py --arms full no_timing --seeds 0 1 2 --out experiments/results/hit_filter_ablation
    python bench/hit_filter_study.py --device cuda --jobs 7 ...      (several trainings at once on one GPU)

Each (arm, seed) trains in its own process with muonreg's training loop, without an MLflow store,
and writes `<arm>-seed<k>.json` (settings, timing, validation, test and held-out metrics, each at the
cuts set on validation: choices are made on validation, figures reported on the held-out set); the
summary goes to `summary.md` and `summary.json`. `--set KEY=VALUE` changes every arm (e.g. the
training set's size: data.simulation.events=1000).
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf
from scipy import stats

from muonreg.config import project_root, validate
from muonreg.data.dataset import MuonEventDataset, make_loader
from muonreg.data.format import DatasetReader
from muonreg.evaluation.filter_evaluation import evaluate_filter, filter_evaluation, set_validation_cuts
from muonreg.training.checkpoint import load_checkpoint
from muonreg.training.device import allow_tf32, autocast_dtype, evaluation_dtype, resolve_device
from muonreg.training.health import HealthGuard
from muonreg.training.loop import Trainer
from muonreg.training.optim import build_optimizer, build_scheduler
from muonreg.training.setup import build_data, build_loaders, build_model, dataset_path, fit_normalizations

# What each arm changes from the shipped filter (conf/model/hit_filter.yaml).
ARMS: dict[str, list[str]] = {
    "full": [],
    "no_timing": ["model.timing=false"],  # no time residuals: trigger-strip timing off
    "phi_order": ["model.order=phi"],  # neighbours in phi order, not (sector, pointing angle)
    "fewer_neighbours": ["model.neighbours=3"],
    "six_neighbours": ["model.neighbours=6"],  # the default before 2026-12-05
    "one_layer": ["model.layers=1"],
    "attention_beside": ["model.attention_layers=1"],  # a windowed attention layer after the neighbourhoods
    "wide": [
        "model.dim=32",
        "model.layers=3",
        "model.neighbours=8",
        "model.edge_dim=16",
        "model.message_dim=8",
    ],
    "attention_only": ["model.layers=0", "model.order=phi", "model.attention_layers=3"],  # the earlier design
    # the reference's filter size (hepattn NGT: dim 256, 8 layers, windows of 512 hits sorted by phi): GPU only
    "reference_size": [
        "model.layers=0",
        "model.order=phi",
        "model.attention_layers=8",
        "model.dim=256",
        "model.heads=16",
        "model.window=512",
    ],
}
HELDOUT = ["data.simulation.seed=777", "+data.simulation.alignment_seed=777", "data.simulation.events=500"]
REPORTED = {  # held-out metric: column heading
    "auc": "AUC",
    "wp0.99/efficiency": "0.99: efficiency",
    "wp0.99/purity": "purity",
    "wp0.99/background_rejection": "rejection",
    "wp0.99/hits_kept_per_event": "hits kept / event",
    "wp0.99/muons_lost": "muons < 3 hits",
    "wp0.995/efficiency": "0.995: efficiency",
    "wp0.995/purity": "purity",
    "wp0.995/background_rejection": "rejection",
    "wp0.995/muons_lost": "muons < 3 hits",
}
ROAD_REPORTED = ("auc", "efficiency", "purity", "background_rejection", "hits_kept_per_event")
ROAD_LAYERS = 8  # the road search's working point nearest 99 % muon-hit efficiency


def compose_cfg(overrides: list[str], check: bool = True) -> DictConfig:
    with initialize_config_dir(config_dir=str(project_root() / "conf"), version_base="1.3"):
        cfg = compose(config_name="train", overrides=["+experiment=hit_filter", *overrides])
    if check:  # the held-out set is all test: no training split to validate
        validate(cfg)
    return cfg


def train_one(arm: str, seed: int, device: str, extra: list[str], out: Path) -> dict:
    """Train and evaluate one (arm, seed); the record written to `<arm>-seed<seed>.json`."""
    cfg = compose_cfg([*ARMS[arm], f"seed={seed}", f"trainer.device={device}", *extra])
    torch.manual_seed(seed)
    np.random.seed(seed)
    dev = resolve_device(device)
    allow_tf32(dev, cfg.trainer.tf32)
    data = build_data(cfg, progress=False)
    model = build_model(cfg, data.features)
    fit_normalizations(model, data.datasets["train"], [], standardize_inputs=cfg.model.standardize_inputs)
    model.to(dev)
    loaders = build_loaders(cfg, data, dev)
    optimizer = build_optimizer(model, cfg.trainer.lr, cfg.trainer.weight_decay)
    steps = len(loaders["train"].batch_sampler)
    run_dir = out / "runs" / f"{arm}-seed{seed}"
    trainer = Trainer(
        model,
        optimizer,
        build_scheduler(optimizer, steps * cfg.trainer.max_epochs),
        loaders,
        device=dev,
        amp_dtype=autocast_dtype(dev, cfg.trainer.precision),
        grad_clip=cfg.trainer.grad_clip,
        max_epochs=cfg.trainer.max_epochs,
        monitor=cfg.optimized_metric,
        checkpoint_dir=run_dir / "checkpoints",
        guard=HealthGuard(cfg.trainer.max_consecutive_nonfinite, run_dir / "nonfinite"),
        metadata={"config": OmegaConf.to_container(cfg, resolve=True)},
        evaluator=functools.partial(evaluate_filter, working_points=tuple(cfg.model.working_points)),
    )
    start = time.perf_counter()
    trainer.fit()
    train_seconds = time.perf_counter() - start
    model.load_state_dict(load_checkpoint(run_dir / "checkpoints" / "best.pt")["model"])
    amp = evaluation_dtype(dev, cfg)
    cuts = set_validation_cuts(model, loaders["val"], dev, amp)
    record = {
        "arm": arm,
        "seed": seed,
        "overrides": [*ARMS[arm], *extra],
        "device": str(dev),
        "parameters": sum(p.numel() for p in model.parameters()),
        "train_events": len(data.datasets["train"]),
        "epochs": cfg.trainer.max_epochs,
        "train_seconds": train_seconds,
        "cuts": {f"{wp:g}": cut for wp, cut in cuts.items()},
    }
    heldout = MuonEventDataset(
        DatasetReader(dataset_path(_heldout_cfg(extra), False)), data.features, [], cfg.data.max_particles
    )
    test_sets = {
        "val": (data.datasets["val"], loaders["val"]),  # what choices are made on
        "test": (data.datasets["test"], loaders["test"]),
        "heldout": (heldout, make_loader(heldout, cfg.trainer.eval_batch_size, shuffle=False)),
    }
    for name, (dataset, loader) in test_sets.items():
        start = time.perf_counter()
        metrics, _ = filter_evaluation(
            model, loader, dataset, dev, amp, list(cfg.model.working_points),
            list(cfg.evaluation.eta_bins), run_dir / name, prefix=name,
        )  # fmt: skip
        record[f"{name}_seconds"] = time.perf_counter() - start
        record[f"{name}_events"] = len(dataset)
        record[name] = {k.removeprefix(f"{name}/"): v for k, v in metrics.items() if "/abseta" not in k}
    record["dataset"], record["heldout_dataset"] = (
        str(data.path),
        str(dataset_path(_heldout_cfg(extra), False)),
    )
    (out / f"{arm}-seed{seed}.json").write_text(json.dumps(record, indent=1))
    return record


def _heldout_cfg(extra: list[str]) -> DictConfig:
    """The held-out pile-up set's config: another simulation seed and detector than training's."""
    return compose_cfg([*extra, *HELDOUT, "data.path=null"], check=False)


def t_interval(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % Student-t interval (n - 1 degrees of freedom)."""
    v = np.asarray(values, dtype=float)
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / np.sqrt(len(v)))


def summarise(out: Path, command: str) -> str:
    """summary.md and summary.json of every run recorded in `out` (`command`: what made them)."""
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*-seed*.json"))]
    arms = list(dict.fromkeys(r["arm"] for r in records))
    lines = [
        "# Hit filter at pile-up 200: each ingredient, on a held-out set (another seed and detector)",
        "",
        f"`{command}`; held-out set: {', '.join(HELDOUT)}. Mean and 95 % t-interval over seeds; each run's "
        "cuts set on its own validation split.",
        "",
        "| arm | seeds | parameters | train s | " + " | ".join(REPORTED.values()) + " |",
        "|" + "---|" * (4 + len(REPORTED)),
    ]
    table = {}
    for arm in arms:
        rows = [r for r in records if r["arm"] == arm]
        cells = [
            arm,
            str(len(rows)),
            str(rows[0]["parameters"]),
            f"{np.mean([r['train_seconds'] for r in rows]):.0f}",
        ]
        table[arm] = {}
        for key in REPORTED:
            values = [r["heldout"][key] for r in rows]
            mean, half = t_interval(values)
            table[arm][key] = {"mean": mean, "t95": half, "values": values}
            cells.append(f"{mean:.4g} ± {half:.2g}" if half == half else f"{mean:.4g}")
        lines.append("| " + " | ".join(cells) + " |")
    chosen_on = [arm for arm in arms if all("val" in r for r in records if r["arm"] == arm)]
    if chosen_on:  # records since 2026-12-05 also hold the validation split, where arms are chosen
        lines += ["", "On validation (where the arms are chosen): " + "; ".join(
            f"{arm} AUC {np.mean([r['val']['auc'] for r in records if r['arm'] == arm]):.5f}, rejection "
            + "{:.4g} ± {:.2g}".format(
                *t_interval([r["val"]["wp0.99/background_rejection"] for r in records if r["arm"] == arm])
            )
            + " at 0.99"
            for arm in chosen_on
        )]  # fmt: skip
    if records:  # the road search has no seed: the same held-out hits give the same figures
        road = records[0]["heldout"]
        name = f"road/layers{ROAD_LAYERS}"
        table["road_search"] = {
            key: road[f"road/{key}" if key == "auc" else f"{name}/{key}"] for key in ROAD_REPORTED
        }
        lines += [
            "",
            f"Road search on the same hits (muonreg.reco.road_search, >= {ROAD_LAYERS} layers in the road): "
            + ", ".join(
                f"{key.replace('_', ' ')} {value:.4g}" for key, value in table["road_search"].items()
            ),
        ]
    (out / "summary.json").write_text(json.dumps(table, indent=1))
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arms", nargs="+", default=["full"], choices=list(ARMS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--jobs", type=int, default=1, help="trainings at once (each its own process)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--one", nargs=2, metavar=("ARM", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument(
        "--summarise", metavar="COMMAND", help="only tabulate the runs in --out (made by COMMAND)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if args.summarise:
        print(summarise(args.out, args.summarise))
        return
    if args.one:
        train_one(args.one[0], int(args.one[1]), args.device, args.set, args.out)
        return
    for cfg in (compose_cfg(args.set), _heldout_cfg(args.set)):  # the datasets, once
        print(f"dataset: {dataset_path(cfg)}", flush=True)
    jobs = [(arm, seed) for arm in args.arms for seed in args.seeds]
    running: list[tuple[subprocess.Popen, str]] = []
    failed = []
    while jobs or running:
        while jobs and len(running) < args.jobs:
            arm, seed = jobs.pop(0)
            command = [
                sys.executable,
                __file__,
                "--one",
                arm,
                str(seed),
                "--device",
                args.device,
                "--out",
                str(args.out),
            ]
            log = open(args.out / f"{arm}-seed{seed}.log", "w")  # noqa: SIM115 (closed with the process)
            running.append(
                (
                    subprocess.Popen([*command, "--set", *args.set], stdout=log, stderr=log),
                    f"{arm}-seed{seed}",
                )
            )
        time.sleep(2)
        for process, name in list(running):
            if process.poll() is not None:
                running.remove((process, name))
                print(
                    f"{name}: {'done' if process.returncode == 0 else f'FAILED ({process.returncode})'}",
                    flush=True,
                )
                if process.returncode:
                    failed.append(name)
    print(summarise(args.out, f"python {' '.join(sys.argv)}"))
    if failed:
        sys.exit(f"failed: {failed} (logs in {args.out})")


if __name__ == "__main__":
    main()
