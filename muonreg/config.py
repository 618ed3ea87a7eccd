"""Configuration: the `muonreg.root` resolver, start-up validation and flattening for MLflow.

Hydra already rejects unknown keys and unknown group options with the allowed choices; this
module checks the *values*, before any data is generated or read, so a bad override fails in
the first second with a message that names the key.
"""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

from muonreg.data.features import DERIVED
from muonreg.data.format import is_dataset, read_metadata
from muonreg.data.schema import HIT_FEATURES
from muonreg.errors import UserError
from muonreg.models.hit_filter import ORDERS
from muonreg.training.distributed import LAUNCH_TIME

POOLING_OPS = ("mean", "sum", "max", "min", "station", "fit")
THRESHOLD_MODES = ("hard", "soft")
REGRESSION_TASKS = ("weighted_pooling", "object_regression")
PRECISIONS = ("auto", "fp32", "bf16")
MODEL_KINDS = ("tracker", "hit_filter")  # model.kind; the tracker's options leave it out
MAX_SEED = 2**32 - 1  # numpy's seed range
# Each config group and a key its option must set: `pooling=[]` composes to no option at all.
GROUP_KEYS = {
    "data": "split",
    "data/features": "columns",
    "model": "dim",
    "tasks": "name",
    "pooling": "ops",
    "threshold": "mode",
    "inverse_fields": "targets",
    "trainer": "batch_size",
}


class ConfigError(UserError, ValueError):
    """A configuration value is invalid; the message names the key and what is allowed."""


def project_root() -> Path:
    """The directory holding train.py and conf/ (MUONREG_ROOT overrides it)."""
    env = os.environ.get("MUONREG_ROOT")
    return Path(env).resolve() if env else Path(__file__).resolve().parents[1]


def launch_time(pattern: str) -> str:
    """`${muonreg.now:PATTERN}`: Hydra's `now`, except that every rank of a distributed job gets rank 0's
    launch time (muonreg.training.distributed.share_launch_time), so all name the same directory."""
    stamp = os.environ.get(LAUNCH_TIME)
    return (datetime.fromtimestamp(float(stamp)) if stamp else datetime.now()).strftime(pattern)


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("muonreg.root"):
        OmegaConf.register_new_resolver("muonreg.root", lambda: str(project_root()))
    if not OmegaConf.has_resolver("muonreg.now"):
        OmegaConf.register_new_resolver("muonreg.now", launch_time, use_cache=True)


register_resolvers()


def _dataset_columns(cfg: DictConfig) -> list[str]:
    """Hit columns of the run's dataset, read from its metadata (the simulator's when simulated)."""
    if cfg.data.path is None:
        return list(HIT_FEATURES)
    path = Path(str(cfg.data.path))
    if not is_dataset(path):
        _fail(
            "data.path",
            str(path),
            "is not a dataset in the hepattn ATLAS-muon layout (needs metadata.yaml, "
            "event_file_indices.npy, event_row_indices.npy and data/*.h5)",
        )
    return list(read_metadata(path)["hit_features"])


def feature_names(cfg: DictConfig) -> list[str]:
    """The model's hit inputs: stored columns, then derived features."""
    return [*cfg.data.features.columns, *cfg.data.features.derived]


def is_hit_filter(cfg: DictConfig) -> bool:
    """The run trains the hit filter (model=hit_filter), not the tracker."""
    return cfg.model.get("kind", "tracker") == "hit_filter"


def _fail(key: str, value: Any, why: str) -> None:
    raise ConfigError(f"{key}={value!r} {why}")


def validate(cfg: DictConfig) -> None:
    """Check every value that a typo could break; raise ConfigError naming the key."""
    for group, key in GROUP_KEYS.items():
        node = OmegaConf.select(cfg, group.replace("/", "."))
        if not isinstance(node, DictConfig) or key not in node:
            options = sorted(p.stem for p in (project_root() / "conf" / group).glob("*.yaml"))
            raise ConfigError(f"{group} selects no option (e.g. {group}=[]); choose one of {options}")
    t = cfg.assignment_threshold
    if not isinstance(t, (int, float)) or not 0 < t < 1:
        _fail("assignment_threshold", t, "must be a number strictly between 0 and 1")
    if not isinstance(cfg.seed, int) or not 0 <= cfg.seed <= MAX_SEED:
        _fail("seed", cfg.seed, f"must be an integer from 0 to {MAX_SEED}")
    if cfg.threshold.mode not in THRESHOLD_MODES:
        _fail("threshold.mode", cfg.threshold.mode, f"must be one of {list(THRESHOLD_MODES)}")
    if cfg.tasks.name not in REGRESSION_TASKS:
        _fail("tasks.name", cfg.tasks.name, f"must be one of {list(REGRESSION_TASKS)}")
    ops = list(cfg.pooling.ops)
    if not ops or any(op not in POOLING_OPS for op in ops) or len(set(ops)) != len(ops):
        _fail("pooling.ops", ops, f"must be a non-empty subset of {list(POOLING_OPS)} without repeats")
    if cfg.pooling.get("local", False) and "fit" not in ops:
        _fail(
            "pooling.local",
            True,
            "needs `fit` among pooling.ops (local coordinates are relative to the fitted track)",
        )
    weights = cfg.tasks.get("loss_weights") or {}
    unknown = [f for f in weights if f not in cfg.inverse_fields.targets]
    if unknown:
        _fail(
            "tasks.loss_weights",
            dict(weights),
            f"names {unknown}, not among the targets {list(cfg.inverse_fields.targets)}",
        )
    targets, inverse = list(cfg.inverse_fields.targets), list(cfg.inverse_fields.inverse)
    for field in inverse:
        if field not in targets:
            _fail(
                "inverse_fields.inverse",
                inverse,
                f"names {field!r}, which is not a target; targets are {targets}",
            )
    names = feature_names(cfg)
    if len(set(names)) != len(names):
        _fail("data.features", names, "repeats a feature")
    columns = _dataset_columns(cfg)
    _check_columns_in_dataset(cfg, columns)
    for key in ("columns", "derived"):
        allowed = columns if key == "columns" else list(DERIVED)
        unknown = [n for n in cfg.data.features[key] if n not in allowed]
        if unknown:
            _fail(
                f"data.features.{key}", list(cfg.data.features[key]), f"names {unknown}; allowed: {allowed}"
            )
    hit_fields = cfg.tasks.get("hit_fields")
    if hit_fields is not None and any(f not in names for f in hit_fields):
        missing = [f for f in hit_fields if f not in names]
        _fail("tasks.hit_fields", list(hit_fields), f"names {missing}, not among the input features {names}")
    m, d = cfg.model, cfg.data
    if m.get("kind", "tracker") not in MODEL_KINDS:
        _fail("model.kind", m.kind, f"must be one of {list(MODEL_KINDS)}")
    if m.dim % m.heads:
        _fail("model.heads", m.heads, f"must divide model.dim={m.dim}")
    if is_hit_filter(cfg):
        _validate_hit_filter(m, names)
    else:
        if m.num_queries < d.max_particles:
            _fail(
                "model.num_queries", m.num_queries, f"must be at least data.max_particles={d.max_particles}"
            )
        if not 0 < m.mask_threshold < 1:
            _fail("model.mask_threshold", m.mask_threshold, "must be strictly between 0 and 1")
        if not 0 < m.hit_mask.get("threshold", 0.5) < 1:
            _fail("model.hit_mask.threshold", m.hit_mask.threshold, "must be strictly between 0 and 1")
    split = list(d.split)
    if len(split) != 3 or any(f < 0 for f in split) or sum(split) > 1 + 1e-9 or split[0] <= 0:
        _fail("data.split", split, "must be [train, val, test] fractions, train > 0, summing to at most 1")
    tr = cfg.trainer
    device = str(tr.device)
    if device not in ("auto", "cpu", "cuda") and not (device.startswith("cuda:") and device[5:].isdigit()):
        _fail("trainer.device", device, "must be auto, cpu, cuda or cuda:N")
    if tr.precision not in PRECISIONS:
        _fail("trainer.precision", tr.precision, f"must be one of {list(PRECISIONS)}")
    if cfg.evaluation.get("precision", "fp32") not in PRECISIONS:
        _fail("evaluation.precision", cfg.evaluation.precision, f"must be one of {list(PRECISIONS)}")
    if not isinstance(tr.tf32, bool):
        _fail("trainer.tf32", tr.tf32, "must be true or false")
    for key in ("batch_size", "eval_batch_size", "max_epochs", "max_consecutive_nonfinite"):
        if not isinstance(tr[key], int) or tr[key] < 1:
            _fail(f"trainer.{key}", tr[key], "must be a positive integer")
    if tr.num_workers != "auto" and (not isinstance(tr.num_workers, int) or tr.num_workers < 0):
        _fail("trainer.num_workers", tr.num_workers, "must be auto or a number of loader processes >= 0")
    if not tr.lr > 0:
        _fail("trainer.lr", tr.lr, "must be positive")
    for key in ("checkpoint_every_steps", "checkpoint_every_minutes"):
        if not isinstance(tr[key], (int, float)) or tr[key] < 0:
            _fail(f"trainer.{key}", tr[key], "must be a number >= 0 (0: off)")
    if not str(cfg.optimized_metric).startswith("val/"):
        _fail(
            "optimized_metric",
            cfg.optimized_metric,
            "must be a validation metric, e.g. val/loss or val/qpt_resolution (the q/pT resolution)",
        )
    if cfg.resume is not None and cfg.resume != "auto" and not Path(str(cfg.resume)).is_file():
        _fail("resume", cfg.resume, "must be null, auto or the path of a checkpoint file")
    _validate_evaluation_sets(cfg)


def _is_seed(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_SEED


def _validate_evaluation_sets(cfg: DictConfig) -> None:
    """evaluation.validation and evaluation.heldout: their own events, never the training data's."""
    seeds = {"data.simulation.seed": cfg.data.simulation.seed}
    for name in ("validation", "heldout"):
        block = cfg.evaluation[name]
        key = f"evaluation.{name}"
        if not isinstance(block.events, int) or block.events < 0:
            _fail(f"{key}.events", block.events, "must be a number of events >= 0 (0: none)")
        if not _is_seed(block.seed):
            _fail(f"{key}.seed", block.seed, f"must be an integer from 0 to {MAX_SEED}")
        if not block.events:
            continue
        if block.seed in seeds.values():
            other = next(k for k, v in seeds.items() if v == block.seed)
            _fail(f"{key}.seed", block.seed, f"is also {other}: the two would share their events")
        seeds[f"{key}.seed"] = block.seed
    heldout = cfg.evaluation.heldout
    if heldout.alignment_seed is not None and not _is_seed(heldout.alignment_seed):
        _fail("evaluation.heldout.alignment_seed", heldout.alignment_seed, "must be null or a seed >= 0")
    shift = heldout.energy_loss_shift
    if not isinstance(shift, (int, float)) or not -0.5 < shift < 0.5:
        _fail("evaluation.heldout.energy_loss_shift", shift, "must be a relative shift between -0.5 and 0.5")


def _check_columns_in_dataset(cfg: DictConfig, columns: list[str]) -> None:
    """A known hit column that the run's dataset lacks: say so, with the override that trains without it."""
    wanted = list(cfg.data.features.columns)
    lacking = [c for c in wanted if c in HIT_FEATURES and c not in columns]
    if lacking:
        kept = ",".join(c for c in wanted if c not in lacking)
        _fail(
            "data.path",
            str(cfg.data.path),
            f"has no hit column {', '.join(map(repr, lacking))} (its metadata.yaml), which "
            f"data.features.columns uses; train without it: 'data.features.columns=[{kept}]'",
        )


def _validate_hit_filter(m: DictConfig, names: list[str]) -> None:
    if m.order not in ORDERS:
        _fail("model.order", m.order, f"must be one of {list(ORDERS)}")
    if m.order == "phi" and m.sort_by not in names:
        _fail("model.sort_by", m.sort_by, f"must be one of the input features {names}")
    for key in ("layers", "neighbours", "attention_layers"):
        if not isinstance(m[key], int) or m[key] < 0:
            _fail(f"model.{key}", m[key], "must be a whole number >= 0")
    if not (m.layers and m.neighbours) and not m.attention_layers:
        _fail(
            "model.layers",
            m.layers,
            "the filter needs neighbourhood layers (and neighbours) or attention_layers",
        )
    if m.window is not None and (not isinstance(m.window, int) or m.window < 1):
        _fail("model.window", m.window, "must be a positive number of hits, or null for full attention")
    wps = list(m.working_points)
    if not wps or any(not isinstance(wp, float) or not 0 < wp < 1 for wp in wps):
        _fail(
            "model.working_points",
            wps,
            "must be muon-hit efficiencies strictly between 0 and 1, e.g. [0.99, 0.995]",
        )


def flatten(cfg: DictConfig | dict, prefix: str = "") -> dict[str, str]:
    """Resolved config as {'a.b.c': 'value'} for MLflow params (lists as their YAML-ish repr)."""
    node = OmegaConf.to_container(cfg, resolve=True) if isinstance(cfg, (DictConfig, ListConfig)) else cfg
    out: dict[str, str] = {}
    for key, value in node.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = str(value)
    return out
