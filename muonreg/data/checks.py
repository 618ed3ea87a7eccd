"""Checks of a dataset's truth made before training, from the small per-file track arrays.

Reading every event takes as long as an epoch, so a dataset with a bad row would otherwise train
for hours and fail in the metrics. The track and hit-count arrays are a few bytes per event: reading
them once finds, in seconds, event rows past a file's end, unphysical truth (pT <= 0, non-finite
values, a charge other than ±1), events with more muons than `data.max_particles` and splits without
a single muon. Every error names file and event row. Events whose muons left no hit can be trained
on, but hint at a broken preparation: they are counted in a warning naming the first.
"""

from __future__ import annotations

import logging

import numpy as np

from muonreg.data.format import DataFormatError, DatasetReader

log = logging.getLogger(__name__)

PT, Q = "truthMuon_pt", "truthMuon_q"


def _check_file(reader: DatasetReader, file_idx: int, rows: np.ndarray, events: np.ndarray) -> np.ndarray:
    """Muons per event of `events` (rows `rows` of file `file_idx`), after checking their truth."""
    file = reader.files[file_idx]
    where = f"event row {rows[0]} (dataset event {events[0]}) and the file's other rows"
    num_tracks, tracks = reader.track_arrays(file_idx, where)
    outside = np.flatnonzero((rows < 0) | (rows >= len(num_tracks)))
    if len(outside):
        i = outside[0]
        raise DataFormatError(
            f"{file}: event row {rows[i]} (dataset event {events[i]}) is past the file's end "
            f"(rows 0..{len(num_tracks) - 1}); see event_row_indices.npy"
        )
    counts = num_tracks[rows]
    bad = np.flatnonzero((counts < 0) | (counts > tracks.shape[1]))
    if len(bad):
        i = bad[0]
        raise DataFormatError(
            f"{file}: event row {rows[i]} (dataset event {events[i]}): num_tracks={counts[i]} "
            f"outside 0..{tracks.shape[1]}"
        )
    used = tracks[rows]  # [events, max_tracks, columns]
    slot = np.arange(tracks.shape[1])[None, :] < counts[:, None]
    problems = ~np.isfinite(used)
    columns = reader.track_index
    if PT in columns:
        problems[..., columns[PT]] |= ~(used[..., columns[PT]] > 0)
    if Q in columns:
        problems[..., columns[Q]] |= ~np.isin(used[..., columns[Q]], (-1.0, 1.0))
    problems &= slot[..., None]
    if problems.any():
        i, track, col = np.argwhere(problems)[0]
        name = reader.track_features[col]
        rule = {PT: "finite and > 0", Q: "±1"}.get(name, "finite")
        raise DataFormatError(
            f"{file}: event row {rows[i]} (dataset event {events[i]}): {name}={used[i, track, col]} "
            f"for track {track}; it must be {rule}"
        )
    return counts


def _events(n: int, such: bool = False) -> str:
    return f"{n}{' such' * such} event{'s' * (n != 1)}"


def _where(reader: DatasetReader, index: int) -> str:
    file_idx, row = reader.locate(index)
    return f"{reader.files[file_idx]}: event row {row}"


def check_truth(reader: DatasetReader, splits: dict[str, np.ndarray], max_particles: int) -> None:
    """Raise DataFormatError, naming file and event row, for truth that training cannot use; warn of
    events with muons but no hit."""
    used = np.concatenate([np.asarray(idx, dtype=np.int64) for idx in splits.values()])
    files, rows = np.asarray(reader.file_indices)[used], np.asarray(reader.row_indices)[used]
    muons = np.zeros(len(reader), dtype=np.int64)
    for file_idx in np.unique(files):
        picked = np.flatnonzero(files == file_idx)
        muons[used[picked]] = _check_file(reader, int(file_idx), rows[picked], used[picked])
    crowded = used[muons[used] > max_particles]
    if len(crowded):
        first = int(crowded[0])
        raise DataFormatError(
            f"{_where(reader, first)} (dataset event {first}) has {muons[first]} muons, more than "
            f"data.max_particles={max_particles} ({_events(len(crowded), such=True)}); "
            f"raise data.max_particles (and model.num_queries with it) to train on them"
        )
    hitless = used[(muons[used] > 0) & (reader.num_hits()[used] == 0)]
    if len(hitless):
        first = int(hitless[0])
        log.warning(
            "%s carry truth muons but no hit (the first: %s, dataset event %d): they are trained "
            "on as muons nothing can find; check the dataset's preparation",
            _events(len(hitless)),
            _where(reader, first),
            first,
        )
    for name, indices in splits.items():
        if len(indices) and not muons[indices].any():
            split_files = np.unique(np.asarray(reader.file_indices)[indices])
            names = [str(reader.files[i].relative_to(reader.path)) for i in split_files]
            raise DataFormatError(
                f"{reader.path}: the {name} split (dataset events {indices[0]}..{indices[-1]}) holds no "
                f"muon: num_tracks is 0 in every one of its event rows (files {', '.join(names)})"
            )
