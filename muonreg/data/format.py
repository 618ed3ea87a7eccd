"""Read and write the hepattn ATLAS-muon dataset layout (DESIGN section 2).

A dataset is a directory with `metadata.yaml`, `event_file_indices.npy`, `event_row_indices.npy`
and `data/*.h5`. Each HDF5 file holds NaN-padded `hits` [events, max_hits, F] and `tracks`
[events, max_tracks, 4] plus `num_hits`, `num_tracks` and `event_numbers`. A row is read as
`hits[row, :num_hits]`, so the padding never leaves this module.

The reader opens files lazily, per process (so DataLoader workers each get their own handles),
and reads a block of rows at a time, one HDF5 chunk high: a gzip file decompresses whole chunks,
so reading an event alone would decompress a chunk's worth for one event. A few recent blocks
are kept (bounded memory); samplers that visit events block by block decompress each block once
(`block_ids`). Every event returned is checked: errors name the file, the event row and the problem.
"""

from __future__ import annotations

import os
import shutil
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import h5py
import numpy as np
import yaml

from muonreg.data.schema import HIT_FEATURES, NOISE_LINK, TRACK_FEATURES, TRUTH_LINK
from muonreg.errors import UserError

METADATA = "metadata.yaml"
FILE_INDICES = "event_file_indices.npy"
ROW_INDICES = "event_row_indices.npy"
MIN_BLOCK_ROWS, MAX_BLOCK_ROWS = 256, 1024  # rows read at once: the file's chunk height, within these bounds
MAX_ROWS_PER_EVENT = np.iinfo(np.int16).max  # num_hits and num_tracks are stored as int16


class DataFormatError(UserError, ValueError):
    """A dataset on disk does not follow the layout; the message names file, row and problem."""


@dataclass(frozen=True)
class Event:
    """One event as stored: columns in the dataset's own order, no padding."""

    hits: np.ndarray  # float32 [num_hits, len(hit_features)]
    tracks: np.ndarray  # float32 [num_tracks, len(track_features)]
    event_number: int


@dataclass
class _Block:
    """Consecutive rows of one file, decompressed once: hits stored compactly (no padding)."""

    start: int
    hits: np.ndarray  # [sum of num_hits, F]
    offsets: np.ndarray  # event i's hits are hits[offsets[i]:offsets[i + 1]]
    num_tracks: np.ndarray
    tracks: np.ndarray  # [rows, max_tracks, 4], NaN-padded
    numbers: np.ndarray | None


def is_dataset(path: str | os.PathLike) -> bool:
    """True when `path` is a directory holding the files of the layout."""
    path = Path(path)
    return all((path / name).is_file() for name in (METADATA, FILE_INDICES, ROW_INDICES))


def read_metadata(path: str | os.PathLike) -> dict:
    """The dataset's `metadata.yaml`, checked for the keys every reader needs."""
    meta_path = Path(path) / METADATA
    try:
        with open(meta_path) as f:
            metadata = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise DataFormatError(f"{meta_path}: not valid YAML ({err})") from err
    if not metadata:
        raise DataFormatError(
            f"{meta_path} is empty; it must list hit_features, track_features and event_mapping"
        )
    if not isinstance(metadata, dict):
        raise DataFormatError(f"{meta_path}: expected a mapping of keys, found {type(metadata).__name__}")
    for key in ("hit_features", "track_features", "event_mapping"):
        if key not in metadata:
            raise DataFormatError(f"{meta_path}: missing key '{key}'")
    return metadata


@contextmanager
def _reading(file: Path, where: str) -> Iterator[None]:
    """h5py reports a truncated file or a corrupted compressed chunk as a bare OSError: name them."""
    try:
        yield
    except OSError as err:
        raise DataFormatError(
            f"{file}: {where}: cannot be read, the file is truncated or corrupted ({err})"
        ) from err


def _decode(names: Iterable) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in names]


class DatasetReader:
    """Random access to the events of one dataset directory, in constant memory."""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        required_hit_features: Iterable[str] = (TRUTH_LINK,),
        required_track_features: Iterable[str] = TRACK_FEATURES,
        max_tracks: int | None = None,
        cache_blocks: int = 4,
    ):
        self.path = Path(path)
        self.cache_blocks = cache_blocks
        self._cache: OrderedDict[tuple[int, int], _Block] = OrderedDict()
        self._block_rows: dict[int, int] = {}  # per file: asking HDF5 costs more than reading an event
        if not self.path.is_dir():
            raise DataFormatError(f"{self.path}: not a directory (expected a dataset in the hepattn layout)")
        for name in (METADATA, FILE_INDICES, ROW_INDICES):
            if not (self.path / name).is_file():
                raise DataFormatError(
                    f"{self.path}: missing {name}; this is not a dataset in the hepattn layout"
                )
        meta_path = self.path / METADATA
        self.metadata = read_metadata(self.path)
        self.hit_features = _decode(self.metadata["hit_features"])
        self.track_features = _decode(self.metadata["track_features"])
        for kind, have, need in (
            ("hit", self.hit_features, required_hit_features),
            ("track", self.track_features, required_track_features),
        ):
            missing = [n for n in need if n not in have]
            if missing:
                raise DataFormatError(
                    f"{meta_path}: required {kind} column(s) {missing} not in {kind}_features {have}"
                )
        self.hit_index = {n: i for i, n in enumerate(self.hit_features)}
        self.track_index = {n: i for i, n in enumerate(self.track_features)}
        self._link_col = self.hit_index.get(TRUTH_LINK)
        self.max_tracks = max_tracks

        try:
            self.chunks = list(self.metadata["event_mapping"]["chunk_summary"])
        except (KeyError, TypeError) as err:
            raise DataFormatError(f"{meta_path}: event_mapping has no chunk_summary list") from err
        self.files = [self._resolve(c, meta_path) for c in self.chunks]
        # Memory-mapped: millions of events cost no resident memory until touched.
        self.file_indices = np.load(self.path / FILE_INDICES, mmap_mode="r")
        self.row_indices = np.load(self.path / ROW_INDICES, mmap_mode="r")
        if len(self.file_indices) != len(self.row_indices):
            raise DataFormatError(
                f"{self.path}: {FILE_INDICES} has {len(self.file_indices)} entries but "
                f"{ROW_INDICES} has {len(self.row_indices)}"
            )
        if len(self.file_indices) and (
            self.file_indices.min() < 0 or self.file_indices.max() >= len(self.files)
        ):
            raise DataFormatError(
                f"{self.path / FILE_INDICES}: file index outside 0..{len(self.files) - 1} "
                f"(metadata lists {len(self.files)} files)"
            )
        self._handles: dict[int, h5py.File] = {}
        self._pid = os.getpid()

    def _resolve(self, chunk: dict, meta_path: Path) -> Path:
        if not isinstance(chunk, dict) or "h5_file" not in chunk:
            raise DataFormatError(f"{meta_path}: chunk_summary entry {chunk!r} has no h5_file")
        file = self.path / chunk["h5_file"]
        if not file.is_file():
            raise DataFormatError(f"{meta_path}: listed file {chunk['h5_file']} not found at {file}")
        return file

    def __len__(self) -> int:
        return len(self.file_indices)

    def __getstate__(self) -> dict:
        # h5py handles do not cross process boundaries; each worker reopens its own.
        state = self.__dict__.copy()
        state["_handles"] = {}
        state["_cache"] = OrderedDict()
        return state

    def _open(self, file_idx: int) -> h5py.File:
        if self._pid != os.getpid():
            self._handles, self._cache, self._pid = {}, OrderedDict(), os.getpid()
        handle = self._handles.get(file_idx)
        if handle is None:
            handle = h5py.File(self.files[file_idx], "r")
            self._check_file(handle, self.files[file_idx])
            self._handles[file_idx] = handle
        return handle

    def _check_file(self, f: h5py.File, file: Path) -> None:
        for name in ("hits", "tracks", "num_hits", "num_tracks"):
            if name not in f:
                raise DataFormatError(f"{file}: missing dataset '{name}'")
        hits, tracks = f["hits"], f["tracks"]
        if hits.ndim != 3 or hits.shape[2] != len(self.hit_features):
            raise DataFormatError(
                f"{file}: hits has shape {hits.shape}, expected [events, max_hits, {len(self.hit_features)}] "
                f"for the {len(self.hit_features)} hit_features of {METADATA}"
            )
        if tracks.ndim != 3 or tracks.shape[2] != len(self.track_features):
            raise DataFormatError(
                f"{file}: tracks has shape {tracks.shape}, expected [events, max_tracks, "
                f"{len(self.track_features)}] for the track_features of {METADATA}"
            )
        for name in ("num_hits", "num_tracks"):
            if f[name].shape != (hits.shape[0],):
                raise DataFormatError(
                    f"{file}: {name} has shape {f[name].shape}, expected ({hits.shape[0]},)"
                )
        for attr, expected in (("hit_features", self.hit_features), ("track_features", self.track_features)):
            if attr in f.attrs and _decode(f.attrs[attr]) != expected:
                raise DataFormatError(f"{file}: attribute {attr} disagrees with {METADATA}")

    def close(self) -> None:
        for handle in self._handles.values():
            handle.close()
        self._handles = {}

    def locate(self, index: int) -> tuple[int, int]:
        """(file index, row) of dataset event `index`."""
        if not 0 <= index < len(self):
            raise IndexError(f"{self.path}: event {index} outside 0..{len(self) - 1}")
        return int(self.file_indices[index]), int(self.row_indices[index])

    def block_rows(self, file_idx: int) -> int:
        """Rows read together from a file: its HDF5 chunk height (gzip decompresses whole chunks)."""
        if file_idx not in self._block_rows:
            rows = self._open(file_idx)["hits"].chunks
            self._block_rows[file_idx] = (
                int(np.clip(rows[0], MIN_BLOCK_ROWS, MAX_BLOCK_ROWS)) if rows else MIN_BLOCK_ROWS
            )
        return self._block_rows[file_idx]

    def reserve_cache(self, events: int) -> None:
        """Keep enough blocks for `events` consecutive events (a sampler's pool) plus the seams."""
        self.cache_blocks = max(self.cache_blocks, -(-events // MIN_BLOCK_ROWS) + 2)

    def block_ids(self, indices: np.ndarray | None = None) -> np.ndarray:
        """An id per event (all, or `indices`) shared by the events read in one block."""
        indices = np.arange(len(self)) if indices is None else np.asarray(indices)
        files = np.asarray(self.file_indices)[indices]
        rows = np.asarray(self.row_indices)[indices]
        per_file = np.array([self.block_rows(i) for i in range(len(self.files))], dtype=np.int64)
        return files.astype(np.int64) * (1 << 40) + rows // per_file[files]

    def _block(self, file_idx: int, row: int, index: int) -> _Block:
        """The cached block holding `row`, read (and checked) on first use."""
        with _reading(self.files[file_idx], f"event row {row} (dataset event {index})"):
            return self._read_block(file_idx, row, index)

    def _read_block(self, file_idx: int, row: int, index: int) -> _Block:
        rows = self.block_rows(file_idx)
        key = (file_idx, row // rows)
        block = self._cache.get(key)
        if block is not None:
            self._cache.move_to_end(key)
            return block
        f, file = self._open(file_idx), self.files[file_idx]
        if not 0 <= row < f["hits"].shape[0]:
            raise DataFormatError(
                f"{file}: event row {row} (dataset event {index}) outside 0..{f['hits'].shape[0] - 1}"
            )
        r0 = key[1] * rows
        r1 = min(r0 + rows, f["hits"].shape[0])
        num_hits = f["num_hits"][r0:r1].astype(np.int64)
        num_tracks = f["num_tracks"][r0:r1].astype(np.int64)
        for name, counts, limit in (
            ("num_hits", num_hits, f["hits"].shape[1]),
            ("num_tracks", num_tracks, f["tracks"].shape[1]),
        ):
            bad = np.flatnonzero((counts < 0) | (counts > limit))
            if len(bad):
                raise DataFormatError(
                    f"{file}: event row {r0 + bad[0]}: {name}={counts[bad[0]]} outside 0..{limit}"
                )
        width = int(num_hits.max(initial=0))
        padded = f["hits"][r0:r1, :width]  # only the hit slots in use: fewer chunks to decompress
        block = _Block(
            start=r0,
            hits=np.asarray(padded[np.arange(width) < num_hits[:, None]], dtype=np.float32),
            offsets=np.concatenate([[0], np.cumsum(num_hits)]),
            num_tracks=num_tracks,
            tracks=np.asarray(f["tracks"][r0:r1], dtype=np.float32),
            numbers=f["event_numbers"][r0:r1] if "event_numbers" in f else None,
        )
        self._cache[key] = block
        if len(self._cache) > self.cache_blocks:
            self._cache.popitem(last=False)
        return block

    def read(self, index: int) -> Event:
        file_idx, row = self.locate(index)
        block = self._block(file_idx, row, index)
        i = row - block.start
        n_tracks = int(block.num_tracks[i])
        where = f"{self.files[file_idx]}: event row {row} (dataset event {index})"
        if self.max_tracks is not None and n_tracks > self.max_tracks:
            raise DataFormatError(
                f"{where}: {n_tracks} tracks, more than the configured maximum {self.max_tracks}"
            )
        hits = block.hits[block.offsets[i] : block.offsets[i + 1]]
        tracks = block.tracks[i, :n_tracks]
        if not np.isfinite(tracks).all():
            col = self.track_features[int(np.argwhere(~np.isfinite(tracks))[0, 1])]
            raise DataFormatError(f"{where}: non-finite {col} for one of its {n_tracks} tracks")
        if self._link_col is not None:
            link = hits[:, self._link_col]
            bad = ~((link == np.floor(link)) & (link >= NOISE_LINK) & (link < n_tracks))
            if bad.any():
                raise DataFormatError(
                    f"{where}: {TRUTH_LINK} value {float(link[bad][0])} at hit {int(np.argmax(bad))} "
                    f"outside -1..{n_tracks - 1} (num_tracks={n_tracks})"
                )
        number = int(block.numbers[i]) if block.numbers is not None else index
        return Event(hits=hits, tracks=tracks, event_number=number)

    def num_hits(self) -> np.ndarray:
        """Hit count of every event, in dataset order (read from the small per-file count arrays)."""
        counts = np.empty(len(self), dtype=np.int32)
        file_indices = np.asarray(self.file_indices)
        for file_idx in range(len(self.files)):
            selected = np.flatnonzero(file_indices == file_idx)
            if len(selected):
                with _reading(self.files[file_idx], "num_hits"):
                    per_file = self._open(file_idx)["num_hits"][:]
                counts[selected] = per_file[np.asarray(self.row_indices)[selected]]
        return counts

    def track_arrays(self, file_idx: int, where: str) -> tuple[np.ndarray, np.ndarray]:
        """(num_tracks, tracks) of a whole file, a few bytes per event, for checks made up front;
        `where` names the events that needed them, for the error if the file cannot be read."""
        with _reading(self.files[file_idx], where):
            f = self._open(file_idx)
            return f["num_tracks"][:].astype(np.int64), np.asarray(f["tracks"][:], dtype=np.float32)


def _pad(arrays: Sequence[np.ndarray], width: int, min_len: int = 1) -> tuple[np.ndarray, np.ndarray]:
    lengths = np.array([len(a) for a in arrays], dtype=np.int64)
    if len(lengths) and lengths.max() > MAX_ROWS_PER_EVENT:
        raise ValueError(
            f"event {int(lengths.argmax())} has {lengths.max()} rows; num_hits/num_tracks are int16 in the "
            f"layout, so at most {MAX_ROWS_PER_EVENT} fit"
        )
    lengths = lengths.astype(np.int16)
    out = np.full((len(arrays), max(min_len, int(lengths.max(initial=0))), width), np.nan, dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return out, lengths


def write_event_file(
    path: Path,
    hits: Sequence[np.ndarray],
    tracks: Sequence[np.ndarray],
    event_numbers: Sequence[int],
    *,
    hit_features: Sequence[str],
    track_features: Sequence[str],
    compression: str | None = "gzip",
) -> None:
    """Write one HDF5 file of the layout from per-event unpadded arrays (usable from any process)."""
    n = len(hits)
    if not n == len(tracks) == len(event_numbers):
        raise ValueError(
            f"hits, tracks and event_numbers disagree in length ({n}, {len(tracks)}, {len(event_numbers)})"
        )
    hit_arr, num_hits = _pad(hits, len(hit_features))
    track_arr, num_tracks = _pad(tracks, len(track_features))
    # gzip with h5py's automatic chunking, as the reference stage-1 preparation writes;
    # uncompressed files are chunked one event per chunk for cheap random reads.
    opts = {"compression": "gzip"} if compression == "gzip" else {"chunks": (1, *hit_arr.shape[1:])}
    track_opts = {"compression": "gzip"} if compression == "gzip" else {}
    with h5py.File(path, "w", track_order=False) as f:
        f.create_dataset("hits", data=hit_arr, track_times=False, **opts)
        f.create_dataset("tracks", data=track_arr, track_times=False, **track_opts)
        f.create_dataset("num_hits", data=num_hits, track_times=False)
        f.create_dataset("num_tracks", data=num_tracks, track_times=False)
        f.create_dataset("event_numbers", data=np.asarray(event_numbers, dtype=np.int64), track_times=False)
        f.attrs["num_events"] = n
        f.attrs["hit_features"] = list(hit_features)
        f.attrs["track_features"] = list(track_features)


class DatasetWriter:
    """Writes a dataset directory file by file; the directory appears only when complete.

    Files are written into `<out>.partial/` and renamed to `<out>` by `finish()`, so an interrupted
    run never leaves something that looks like a dataset. Output is byte-reproducible.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        *,
        hit_features: Sequence[str] = HIT_FEATURES,
        track_features: Sequence[str] = TRACK_FEATURES,
        processing_parameters: dict | None = None,
        compression: str | None = "gzip",
        source: str = "muonreg-simulate",
    ):
        self.out_dir = Path(out_dir)
        if self.out_dir.exists():
            raise FileExistsError(f"{self.out_dir} already exists; remove it or choose another --out")
        self.tmp_dir = self.out_dir.with_name(self.out_dir.name + ".partial")
        shutil.rmtree(self.tmp_dir, ignore_errors=True)
        (self.tmp_dir / "data").mkdir(parents=True)
        self.hit_features, self.track_features = list(hit_features), list(track_features)
        self.processing_parameters = processing_parameters or {}
        self.compression, self.source = compression, source
        self.chunks: list[dict] = []
        self.file_indices: list[np.ndarray] = []
        self.processing_summary: dict | None = None  # written to metadata.yaml when set (e.g. cut counts)

    def write_file(
        self, hits: Sequence[np.ndarray], tracks: Sequence[np.ndarray], event_numbers: Sequence[int]
    ) -> Path:
        """Write one `data/*.h5` file from per-event unpadded arrays."""
        name = f"data/events_{len(self.chunks):04d}.h5"
        write_event_file(
            self.tmp_dir / name,
            hits,
            tracks,
            event_numbers,
            hit_features=self.hit_features,
            track_features=self.track_features,
            compression=self.compression,
        )
        self.add_file(name, len(hits))
        return self.tmp_dir / name

    def add_file(
        self, name: str, event_count: int, source: str | None = None, worker_id: int | None = None
    ) -> None:
        """Register `name` (relative to the dataset, already written by `write_event_file` into
        `tmp_dir`, e.g. by a worker process) as the next file of the dataset."""
        self.chunks.append(
            {
                "h5_file": name,
                "source_root_file": self.source if source is None else source,
                "event_count": event_count,
                "worker_id": len(self.chunks) if worker_id is None else worker_id,
            }
        )
        self.file_indices.append(np.full(event_count, len(self.chunks) - 1, dtype=np.int64))

    def finish(self) -> Path:
        """Write the metadata and index arrays, then move the dataset into place."""
        file_indices = np.concatenate(self.file_indices) if self.file_indices else np.zeros(0, np.int64)
        row_indices = (
            np.concatenate([np.arange(len(i), dtype=np.int64) for i in self.file_indices])
            if self.file_indices
            else np.zeros(0, np.int64)
        )
        np.save(self.tmp_dir / FILE_INDICES, file_indices)
        np.save(self.tmp_dir / ROW_INDICES, row_indices)
        metadata = {
            "hit_features": self.hit_features,
            "track_features": self.track_features,
            "processing_parameters": self.processing_parameters,
            "event_mapping": {"chunk_summary": self.chunks, "total_events": len(file_indices)},
        }
        if self.processing_summary is not None:
            metadata["processing_summary"] = self.processing_summary
        with open(self.tmp_dir / METADATA, "w") as f:
            yaml.safe_dump(metadata, f, sort_keys=False)
        self.tmp_dir.rename(self.out_dir)
        return self.out_dir

    def abort(self) -> None:
        shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.finish()
        else:
            self.abort()
