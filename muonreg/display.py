"""Look at what the tracker did in one event:
`python -m muonreg.display (--run-id ID | --checkpoint PATH) --event N [--split test] [--out FILE.png]`.

Four panels: the x-y and r-z views of the event's hits (tube and strip centres, metres), coloured
on the left by the true muon they belong to (grey: noise) and on the right by the predicted track
that claims them (probability >= 0.5, the most probable valid query; grey: none). MDT hits carry
their drift circle in the r-z view (the tubes run along phi, so the circle lies in that plane; draw
radius in scale, visible on zoom). Dashed lines: each true muon's and predicted track's direction
(eta, phi) from the interaction point. The legends give pT, eta, phi and q of the true muons and
of the predicted tracks (with their validity probability). With --run-id the PNG is also logged to
the run under `displays/`.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display needed on clusters
import matplotlib.pyplot as plt
import numpy as np
from matplotlib.collections import EllipseCollection

from muonreg.data.dataset import MuonEventDataset, collate
from muonreg.data.format import DatasetReader, Event
from muonreg.data.schema import TRUTH_LINK, Technology
from muonreg.errors import UserError, exit_on_user_errors
from muonreg.evaluation.inference import infer
from muonreg.models import MaskFormer
from muonreg.tracking.store import connect, default_tracking_uri
from muonreg.trained import add_source_arguments, checkpoint_file, load_model
from muonreg.training.setup import dataset_path, hit_features, run_splits

ASSIGNED = 0.5
TRACK_COLOURS = ("C0", "C3", "C2", "C1", "C4", "C5")
NONE = "0.7"  # grey: noise, or claimed by no track
REACH = 22.0  # m: how far the direction lines are drawn


def _hit_positions(event: Event, index: dict[str, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x, y, z (m) of each hit: the middle of its stored low and high edges."""
    low = [event.hits[:, index[f"spacePoint_globEdgeLow{c}"]] for c in "XYZ"]
    high = [event.hits[:, index[f"spacePoint_globEdgeHigh{c}"]] for c in "XYZ"]
    x, y, z = ((lo + hi) / 2e3 for lo, hi in zip(low, high, strict=True))
    return x, y, z


def _direction(ax_xy: plt.Axes, ax_rz: plt.Axes, eta: float, phi: float, colour: str) -> None:
    theta = 2 * np.arctan(np.exp(-eta))
    ax_xy.plot([0, REACH * np.cos(phi)], [0, REACH * np.sin(phi)], "--", color=colour, lw=0.8)
    ax_rz.plot([0, REACH * np.cos(theta)], [0, REACH * np.sin(theta)], "--", color=colour, lw=0.8)


def _panel(
    axes: tuple[plt.Axes, plt.Axes],
    event: Event,
    index: dict[str, int],
    owner: np.ndarray,
    labels: list[tuple[str, float, float]],
    title: str,
    unclaimed: str,
) -> None:
    """One row: x-y and r-z views, hits coloured by `owner` (-1: none); labels: (text, eta, phi)."""
    ax_xy, ax_rz = axes
    x, y, z = _hit_positions(event, index)
    r = np.hypot(x, y)
    colours = np.array(
        [TRACK_COLOURS[k % len(TRACK_COLOURS)] if k >= 0 else NONE for k in owner], dtype=object
    )
    ax_xy.scatter(x, y, s=6, c=list(colours))
    ax_rz.scatter(z, r, s=6, c=list(colours))
    mdt = event.hits[:, index["spacePoint_technology"]] == Technology.MDT
    drift = np.nan_to_num(event.hits[:, index["spacePoint_driftR"]]) / 1e3
    if mdt.any():
        ax_rz.add_collection(
            EllipseCollection(
                2 * drift[mdt],
                2 * drift[mdt],
                0,
                units="xy",
                offsets=np.stack([z[mdt], r[mdt]], 1),
                offset_transform=ax_rz.transData,
                facecolors="none",
                edgecolors=list(colours[mdt]),
                lw=0.5,
            )
        )
    for k, (text, eta, phi) in enumerate(labels):
        colour = TRACK_COLOURS[k % len(TRACK_COLOURS)]
        _direction(ax_xy, ax_rz, eta, phi, colour)
        ax_xy.plot([], [], "o", color=colour, label=text)
    ax_xy.plot([], [], "o", color=NONE, label=unclaimed)
    ax_xy.legend(fontsize=7, loc="upper left")
    for ax, (h, v) in ((ax_xy, ("x [m]", "y [m]")), (ax_rz, ("z [m]", "r [m]"))):
        ax.set_xlabel(h)
        ax.set_ylabel(v)
        ax.set_title(f"{title}: {'x-y' if ax is ax_xy else 'r-z'}", fontsize=9)
    ax_xy.set_aspect("equal", adjustable="box")


def draw_examples(
    model: MaskFormer, dataset: MuonEventDataset, rows: dict[str, np.ndarray], out_dir: str | Path, n: int
) -> list[Path]:
    """Displays of `n` events chosen by the pT residual of the query matched to each true muon
    (TrackRecords rows with "event"): the best, the worst and typical ones between (evenly spaced
    ranks). Every muon counts, reconstructed or not: the worst is often one the tracker missed."""
    if n <= 0 or not len(rows["event"]):
        return []
    residual = np.abs(rows["pred_pt"] / rows["true_pt"] - 1)
    order = np.argsort(residual, kind="stable")
    picks = np.unique(np.linspace(0, len(order) - 1, n).round().astype(int))
    position = {int(e): i for i, e in enumerate(dataset.indices)}
    paths = []
    for rank in picks:
        muon = order[rank]
        event = int(rows["event"][muon])
        label = "best" if rank == 0 else "worst" if rank == len(order) - 1 else f"typical-rank{rank}"
        title = (
            f"{label} of {len(order)} muons by |pT residual|: {residual[muon]:.3f} "
            f"({'reconstructed' if rows['reco'][muon] else 'not reconstructed'}; dataset event {event})"
        )
        paths.append(
            draw_event(model, dataset, position[event], Path(out_dir) / f"{label}-event{event}.png", title)
        )
    return paths


def draw_event(
    model: MaskFormer, dataset: MuonEventDataset, item: int, out: str | Path, title: str = ""
) -> Path:
    """Draw dataset item `item` with the model's predictions to the PNG `out`."""
    reader = dataset.reader
    event = reader.read(int(dataset.indices[item]))
    device = next(model.parameters()).device
    pred = {k: v[0].cpu().numpy() for k, v in infer(model, collate([dataset[item]]), device).items()}
    index, tracks = reader.hit_index, reader.track_index
    truth = event.hits[:, index[TRUTH_LINK]].astype(int)
    valid = pred["valid_probability"] >= 0.5
    p = np.where(valid[:, None], pred["hit_probability"], 0.0)  # [queries, hits]
    owner = np.where(p.max(0) >= ASSIGNED, p.argmax(0), -1)
    true_labels = [
        (
            f"true muon {k}: pT {t[tracks['truthMuon_pt']]:.1f} GeV, eta {t[tracks['truthMuon_eta']]:+.3f}, "
            f"phi {t[tracks['truthMuon_phi']]:+.3f}, q {t[tracks['truthMuon_q']]:+.0f}",
            float(t[tracks["truthMuon_eta"]]),
            float(t[tracks["truthMuon_phi"]]),
        )
        for k, t in enumerate(event.tracks)
    ]
    pred_labels = [
        (
            f"track {q}{'' if valid[q] else ' (invalid)'}: p {pred['valid_probability'][q]:.2f}, "
            f"pT {pred['pt'][q]:.1f} GeV, eta {pred['eta'][q]:+.3f}, phi {pred['phi'][q]:+.3f}, "
            f"q {pred['q'][q]:+.0f}",
            float(pred["eta"][q]),
            float(pred["phi"][q]),
        )
        for q in range(len(valid))
    ]
    fig, axes = plt.subplots(2, 2, figsize=(13, 11), sharex="col", sharey="col")  # rows comparable
    _panel(axes[0], event, index, truth, true_labels, "truth", "noise")
    _panel(axes[1], event, index, owner, pred_labels, "predicted", "no track")
    fig.suptitle(title or f"event {event.event_number}: {len(event.hits)} hits", fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m muonreg.display", description=__doc__.splitlines()[0])
    add_source_arguments(
        parser,
        "a checkpoint written by training (best.pt)",
        "an MLflow run; the PNG is logged to it",
        model_uri=True,
    )
    parser.add_argument(
        "--event", type=int, required=True, help="the event's position in the split (0, 1, ...)"
    )
    parser.add_argument("--split", choices=("test", "val", "train", "all"), default="test")
    parser.add_argument("--data", type=Path, help="dataset directory (default: the one the run trained on)")
    parser.add_argument("--out", type=Path, help="PNG to write (default: display-<split>-<event>.png)")
    args = parser.parse_args(argv)
    with (
        exit_on_user_errors(),
        checkpoint_file(args.checkpoint, args.run_id, args.tracking_uri, args.model_uri) as path,
    ):
        model, cfg = load_model(path)
        data = args.data or dataset_path(cfg)
        reader = DatasetReader(data)
        indices = np.arange(len(reader)) if args.split == "all" else run_splits(cfg, len(reader))[args.split]
        if not 0 <= args.event < len(indices):
            raise UserError(
                f"--event {args.event}: the {args.split} split of {data} has {len(indices)} events"
            )
        features = hit_features(cfg, reader.hit_features, f"dataset {data}")
        dataset = MuonEventDataset(reader, features, [], int(cfg.data.max_particles), indices=indices)
        out = args.out or Path(f"display-{args.split}-{args.event}.png")
        source = f"run {args.run_id}" if args.run_id else args.model_uri or path.name
        draw_event(
            model,
            dataset,
            args.event,
            out,
            f"{source}, {args.split} event {args.event} (dataset event {indices[args.event]})",
        )
        print(f"display: {out}")
        if args.run_id:
            connect(args.tracking_uri or default_tracking_uri()).log_artifact(
                args.run_id, str(out), "displays"
            )
            print(f"logged to run {args.run_id} as displays/{out.name}")


if __name__ == "__main__":
    main()
