"""Build a run's pieces from its config: datasets and loaders, the model, target normalisation."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from muonreg.config import ConfigError, feature_names, is_hit_filter
from muonreg.data.cache import ensure_simulated
from muonreg.data.checks import check_truth
from muonreg.data.dataset import MuonEventDataset, make_loader, split_indices
from muonreg.data.features import DEFAULT_SCALES, HitFeatures
from muonreg.data.format import DatasetReader
from muonreg.data.schema import QPT
from muonreg.data.simulate import SimulationConfig
from muonreg.evaluation.metrics import FIELDS
from muonreg.machine import usable_cores
from muonreg.models import HitFilter, MaskFormer, Matcher
from muonreg.tasks import (
    ObjectHitMaskTask,
    ObjectRegressionTask,
    ObjectValidTask,
    WeightedPoolingObjectHitRegressionTask,
)
from muonreg.tasks.refine import FitRefinedAssignment

log = logging.getLogger(__name__)

# Evaluation always needs the physical parameters, whatever the regression targets are.
EVAL_TARGETS = [f"truthMuon_{f}" for f in FIELDS]
# The separately simulated sets a tracker's run ends on, beside its test split (DESIGN section 8).
EVALUATION_SETS = ("validation", "heldout")


NORMALIZATION_HITS = 500_000  # hits that input standardisation is fitted on, at most
_RUN_KEYS = ("events", "seed", "files")
_OPTIONAL_RUN_KEYS = {"pileup": 0.0}  # mean pile-up; > 0: a filter dataset (data=pileup)


def simulation_settings(simulation: DictConfig) -> tuple[dict, SimulationConfig]:
    """(events/seed/files/pileup, SimulationConfig) from the `data.simulation` config node."""
    raw = OmegaConf.to_container(simulation, resolve=True)
    run = {k: raw.pop(k) for k in _RUN_KEYS} | {k: raw.pop(k, v) for k, v in _OPTIONAL_RUN_KEYS.items()}
    known = set(SimulationConfig.__dataclass_fields__)
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"data.simulation has unknown key(s) {unknown}; "
            f"allowed: {sorted(known | set(_RUN_KEYS) | set(_OPTIONAL_RUN_KEYS))}"
        )
    try:
        return run, SimulationConfig(**raw)
    except ValueError as err:
        raise ConfigError(f"data.simulation: {err}") from err


def dataset_path(cfg: DictConfig, progress: bool = True) -> Path:
    """The dataset directory a run trains on: data.path if set, else the simulated cache."""
    if cfg.data.path is not None:
        return Path(str(cfg.data.path))  # checked by muonreg.config.validate
    run, config = simulation_settings(cfg.data.simulation)
    return ensure_simulated(cfg.paths.data, **run, config=config, progress=progress)


def hit_features(cfg: DictConfig, columns: Sequence[str], where: str) -> HitFeatures:
    """The run's hit inputs over a dataset's stored `columns` (`where` names it in errors)."""
    try:
        return HitFeatures(
            feature_names(cfg),
            columns,
            scales={**DEFAULT_SCALES, **OmegaConf.to_container(cfg.data.scales)},
            missing_sentinels=list(cfg.data.missing_sentinels),
        )
    except ValueError as err:
        raise ConfigError(f"data.features: {err} ({where})") from err


def used_events(cfg: DictConfig, n_events: int) -> int:
    """How many of a dataset's first events a run uses (data.max_events)."""
    return n_events if cfg.data.max_events is None else min(n_events, int(cfg.data.max_events))


def run_splits(cfg: DictConfig, n_events: int) -> dict[str, np.ndarray]:
    """The train/val/test event indices a run uses of a dataset of `n_events` (data.split)."""
    return split_indices(used_events(cfg, n_events), list(cfg.data.split))


@dataclass
class RunData:
    path: Path
    features: HitFeatures
    datasets: dict[str, MuonEventDataset]


def _targets(cfg: DictConfig) -> list[str]:
    return list(dict.fromkeys([*cfg.inverse_fields.targets, *EVAL_TARGETS]))


def _reader(cfg: DictConfig, path: Path) -> DatasetReader:
    return DatasetReader(path, required_track_features=[t for t in _targets(cfg) if t != QPT])


def build_data(cfg: DictConfig, progress: bool = True) -> RunData:
    path = dataset_path(cfg, progress=progress)
    reader = _reader(cfg, path)
    features = hit_features(cfg, reader.hit_features, f"dataset {path}")
    splits = run_splits(cfg, len(reader))
    n = used_events(cfg, len(reader))
    datasets = {
        name: MuonEventDataset(reader, features, _targets(cfg), cfg.data.max_particles, indices=idx)
        for name, idx in splits.items()
    }
    for name, ds in datasets.items():
        if name != "test" and len(ds) == 0:
            raise ConfigError(
                f"data.split={list(cfg.data.split)} leaves the {name} split of {n} events empty"
            )
    check_truth(reader, splits, cfg.data.max_particles)
    return RunData(path, features, datasets)


def simulated_set_path(cfg: DictConfig, name: str, progress: bool = True) -> Path:
    """The cached dataset of `evaluation.<name>` (validation, heldout): the training data's simulation
    (its pile-up too) with its own events and seed, on the training detector unless `alignment_seed` draws another
    misalignment, with the calorimeter loss shifted by `energy_loss_shift` (relative, on its most
    probable value and width)."""
    run, config = simulation_settings(cfg.data.simulation)
    block = cfg.evaluation[name]
    training_detector = run["seed"] if config.alignment_seed is None else config.alignment_seed
    alignment = block.get("alignment_seed")
    shift = 1.0 + float(block.get("energy_loss_shift", 0.0))
    config = dataclasses.replace(
        config,
        alignment_seed=training_detector if alignment is None else int(alignment),
        energy_loss_mpv=config.energy_loss_mpv * shift,
        energy_loss_width=config.energy_loss_width * shift,
    )
    return ensure_simulated(
        cfg.paths.data, int(block.events), int(block.seed), 1, config, run["pileup"], progress=progress
    )


def evaluation_sets(cfg: DictConfig, data: RunData, progress: bool = True) -> dict[str, MuonEventDataset]:
    """The sets a run is evaluated on after its test split: `validation` (a separately simulated
    set of the training detector, for choices between runs; with `evaluation.validation.events=0`, or
    on a `data.path` dataset, the val split) and `heldout` (another seed and another detector state, for
    the headline figures; only for simulated training data, none with `events=0`)."""
    sets = {}
    for name in EVALUATION_SETS:
        if cfg.data.path is None and cfg.evaluation[name].events:
            reader = _reader(cfg, simulated_set_path(cfg, name, progress))
            check_truth(reader, {name: np.arange(len(reader))}, cfg.data.max_particles)
            sets[name] = MuonEventDataset(reader, data.features, _targets(cfg), cfg.data.max_particles)
        elif name == "validation":
            sets[name] = data.datasets["val"]
        elif cfg.data.path is None:
            log.info("no held-out set: evaluation.heldout.events=0")
        else:
            log.info("no held-out set: it is simulated, and this run trains on data.path")
    return sets


def set_evaluation(cfg: DictConfig, name: str) -> DictConfig:
    """The evaluation settings of a set: no event displays (the test split has them), and no fits of
    the assigned hits on the validation set (diagnostics, not choices)."""
    changes = {"displays": 0, **({"assigned_fit_events": 0} if name == "validation" else {})}
    return OmegaConf.merge(cfg.evaluation, changes)


LOADER_WORKERS = 2  # DataLoader processes where the machine has cores beside torch's compute threads


def loader_workers(setting: int | str) -> int:
    """`trainer.num_workers`; `auto`: none on two cores or fewer, where a loader process takes a core
    from torch's compute threads (training on two cores is ~1.1x faster loading in the main process:
    bench/RESULTS.md, "Sweeps"), else LOADER_WORKERS."""
    if setting != "auto":
        return int(setting)
    return 0 if usable_cores() <= 2 else LOADER_WORKERS


def _loader_options(cfg: DictConfig, device: torch.device) -> dict:
    tr = cfg.trainer
    return {
        "num_workers": loader_workers(tr.num_workers),
        "pin_memory": device.type == "cuda" if tr.pin_memory == "auto" else bool(tr.pin_memory),
        "bucket_by_hits": cfg.data.bucket_by_hits,
    }


def eval_loader(
    cfg: DictConfig, dataset: MuonEventDataset, device: torch.device
) -> torch.utils.data.DataLoader:
    """The loader of an evaluated split or set: every event once, in a fixed order."""
    return make_loader(dataset, cfg.trainer.eval_batch_size, shuffle=False, **_loader_options(cfg, device))


def build_loaders(
    cfg: DictConfig, data: RunData, device: torch.device, rank: int = 0, world_size: int = 1
) -> dict[str, torch.utils.data.DataLoader]:
    return {
        "train": make_loader(
            data.datasets["train"],
            cfg.trainer.batch_size,
            shuffle=True,
            seed=cfg.seed,
            rank=rank,
            world_size=world_size,
            **_loader_options(cfg, device),
        ),
        **{split: eval_loader(cfg, data.datasets[split], device) for split in ("val", "test")},
    }


def build_model(cfg: DictConfig, features: HitFeatures) -> MaskFormer | HitFilter:
    """The network `cfg.model` describes: the MaskFormer tracker, or the hit filter (model=hit_filter)."""
    m = cfg.model
    if is_hit_filter(cfg):
        return HitFilter(
            features.size,
            dim=m.dim,
            layers=m.layers,
            neighbours=m.neighbours,
            edge_dim=m.edge_dim,
            message_dim=m.message_dim,
            order=m.order,
            sort_index=features.names.index(m.sort_by) if m.order == "phi" else None,
            timing=m.timing,
            attention_layers=m.attention_layers,
            heads=m.heads,
            window=m.window,
            dropout=m.dropout,
            working_points=tuple(m.working_points),
        )
    targets, inverse = list(cfg.inverse_fields.targets), list(cfg.inverse_fields.inverse)
    field_weights = OmegaConf.to_container(cfg.tasks.loss_weights) if cfg.tasks.get("loss_weights") else None
    if cfg.tasks.name == "weighted_pooling":
        hit_fields = cfg.tasks.hit_fields
        regression = WeightedPoolingObjectHitRegressionTask(
            m.dim,
            hit_fields_index=None if hit_fields is None else [features.names.index(f) for f in hit_fields],
            input_size=features.size,
            fields=targets,
            inverse_fields=inverse,
            assignment_threshold=cfg.assignment_threshold,
            assignment=cfg.threshold.mode,
            pooling=list(cfg.pooling.ops),
            loss_weight=cfg.tasks.loss_weight,
            detach_assignment=cfg.tasks.detach_assignment,
            field_weights=field_weights,
            anchor=cfg.tasks.anchor,
            pull_loss=cfg.tasks.get("pull_loss", 0.0),
            local=cfg.pooling.get("local", False),
            hidden=cfg.tasks.hidden,
        )
    else:
        regression = ObjectRegressionTask(
            m.dim,
            fields=targets,
            inverse_fields=inverse,
            loss_weight=cfg.tasks.loss_weight,
            field_weights=field_weights,
            hidden=cfg.tasks.hidden,
        )
    return MaskFormer(
        input_size=features.size,
        dim=m.dim,
        encoder_layers=m.encoder_layers,
        decoder_layers=m.decoder_layers,
        heads=m.heads,
        num_queries=m.num_queries,
        mask_threshold=m.mask_threshold,
        dropout=m.dropout,
        valid_task=ObjectValidTask(m.dim, **m.valid),
        hit_mask_task=ObjectHitMaskTask(m.dim, **m.hit_mask),
        regression_task=regression,
        matcher=Matcher(m.matcher),
        aux_loss=m.aux_loss,
        refine=FitRefinedAssignment(m.mask_threshold) if m.get("refine", False) else None,
    )


def fit_normalizations(
    model: MaskFormer | HitFilter,
    dataset: MuonEventDataset,
    fields: list[str],
    *,
    standardize_inputs: bool = True,
    n: int = 2000,
) -> None:
    """Input standardisation (unless switched off: the inputs stay as the feature scales leave them)
    and the tracker's target normalisation from up to `n` evenly spread training events, fewer when
    they would hold more than NORMALIZATION_HITS hits (saved with the model, so a checkpoint
    predicts exactly as trained)."""
    mean_hits = max(float(dataset.num_hits().mean()), 1.0) if len(dataset) else 1.0
    n = min(n, len(dataset), max(10, int(NORMALIZATION_HITS / mean_hits)))  # pile-up events hold thousands
    picks = np.unique(np.linspace(0, len(dataset) - 1, n).astype(int))
    items = [dataset[int(i)] for i in picks]
    if standardize_inputs:
        model.input_norm.fit(
            torch.from_numpy(np.concatenate([it["hit_x"] for it in items])),
            torch.from_numpy(np.concatenate([it["hit_x_valid"] for it in items])),
        )
    if isinstance(model, HitFilter):
        return
    valid = torch.from_numpy(np.stack([it["particle_valid"] for it in items]))
    targets = {
        f"particle_{f}": torch.from_numpy(np.stack([it[f"particle_{f}"] for it in items])) for f in fields
    }
    model.regression_task.fit_normalization(targets, valid)
