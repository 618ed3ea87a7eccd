"""ATLAS muon hit-dump ROOT files -> a dataset in the hepattn layout (the pre-filter "filter dataset").

    muonreg-prepare root --input DIR --output DIR [--workers N] [cuts] [--on-error fail|skip]

Follows the reference preparation (hepattn `atlas_muon/prep_events_multiprocess.py`): every
`*.root` file of DIR is read (its first tree, see `root_layout`), one file per task. In each event:
1. hits of excluded technologies are removed (`--no-NSW`: sTGC and MM, `--no-RPC`: RPC); an event
   left without hits is dropped;
2. a truth muon with hits fails if pT < pt_threshold, |eta| > eta_threshold or it keeps fewer than
   num_hits_threshold hits; its hits become background (truthLink -1);
3. the remaining muons are renumbered 0..n-1 in their original order (truthLink follows) and are
   the event's tracks; an event left without a muon is dropped.
No hit limit: pre-filter events have thousands of hits. A source file is read and written in blocks
of 500 entries (bounded memory), each `data/<stem>_<block>.h5`, named with its ROOT file in
`event_mapping.chunk_summary`; metadata.yaml records the cuts
(`processing_parameters`, the reference's key names) and what each cut removed
(`processing_summary`). A muon failing several cuts counts once under each, once in the total.
Truth muons without a single hit are not muons of the event, as in the reference.

An unreadable (corrupt, truncated) file or one without the branches stops the run with its name
(`--on-error fail`) or is skipped (`skip`): the command names the skipped files and their count at
the end, and `processing_summary.files_skipped` of the metadata lists them.
The dataset is written into `<output>.partial` and renamed when complete.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import sys
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import awkward as ak
import numpy as np
import uproot
from tqdm import tqdm

from muonreg.data import root_layout
from muonreg.data.format import METADATA, DatasetWriter, read_metadata, write_event_file
from muonreg.data.schema import HIT_FEATURES, NOISE_LINK, TRACK_FEATURES, TRUTH_LINK, Technology
from muonreg.errors import UserError, exit_on_user_errors

ON_ERROR = ("fail", "skip")
BRANCHES = [*HIT_FEATURES, *TRACK_FEATURES, root_layout.EVENT_NUMBER]
# Entries read, cut and written together (one data/*.h5 each): bounds a worker's memory, ~1 GB at PU200.
EVENTS_PER_FILE = 500
_LINK = HIT_FEATURES.index(TRUTH_LINK)
_TECHNOLOGY = HIT_FEATURES.index("spacePoint_technology")
_PT, _ETA = TRACK_FEATURES.index("truthMuon_pt"), TRACK_FEATURES.index("truthMuon_eta")


class RootFileError(UserError):
    """A ROOT file that cannot be prepared; the message names the file and the problem."""


@dataclass(frozen=True)
class Cuts:
    """The reference's cuts, with its defaults and its metadata key names."""

    pt_threshold: float = 5.0  # GeV: muons below are dropped
    eta_threshold: float = 2.7  # muons with |eta| above are dropped
    num_hits_threshold: int = 3  # muons with fewer hits (after technology removal) are dropped
    no_NSW: bool = False  # remove sTGC and MM hits (the reference's metadata key, capitals included)
    no_rpc: bool = False  # remove RPC hits

    def excluded_technologies(self) -> list[int]:
        return [Technology.STGC, Technology.MM] * self.no_NSW + [Technology.RPC] * self.no_rpc


@dataclass
class Counts:
    """What the cuts did to the events of one or more files."""

    events_seen: int = 0
    events_kept: int = 0
    events_dropped: dict[str, int] = field(default_factory=lambda: {"no_hits": 0, "no_muon": 0})
    muons_seen: int = 0
    muons_kept: int = 0
    muons_dropped: int = 0
    muons_failing: dict[str, int] = field(default_factory=lambda: {"pt": 0, "eta": 0, "num_hits": 0})
    hits_kept: int = 0

    def add(self, other: Counts) -> None:
        for name, value in asdict(other).items():
            if isinstance(value, dict):
                mine = getattr(self, name)
                for key in value:
                    mine[key] += value[key]
            else:
                setattr(self, name, getattr(self, name) + value)


@dataclass
class Events:
    """The events of one file that pass the cuts, per event (schema column order)."""

    hits: list[np.ndarray]
    tracks: list[np.ndarray]
    numbers: np.ndarray


def _first_tree(path: Path, file: uproot.ReadOnlyDirectory) -> uproot.TTree:
    trees = [key for key, kind in file.classnames().items() if kind == "TTree"]
    if not trees:
        raise RootFileError(f"{path}: no TTree in the file (keys: {list(file.keys())})")
    return file[trees[0]]


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """uproot reports a damaged file as OSError, ValueError or errors of its own: name the file."""
    try:
        yield
    except RootFileError:
        raise
    except Exception as err:
        message = " ".join(str(err).split())
        raise RootFileError(
            f"{path}: cannot be read, the file is corrupt or truncated ({type(err).__name__}: {message})"
        ) from err


@contextmanager
def open_tree(path: Path) -> Iterator[uproot.TTree]:
    """The first tree of `path`, checked for the branches the preparation reads."""
    with _reading(path):
        file = uproot.open(path)
    with file:
        with _reading(path):
            tree = _first_tree(path, file)
        missing = [name for name in BRANCHES if name not in tree]
        if missing:
            raise RootFileError(f"{path}: tree {tree.name} has no branch {', '.join(missing)}")
        yield tree


def read_block(path: Path, tree: uproot.TTree, start: int, stop: int) -> ak.Array:
    """Entries start..stop-1 of the branches the preparation reads."""
    with _reading(path):
        return tree.arrays(BRANCHES, entry_start=start, entry_stop=stop, library="ak")


def _flat(arrays: ak.Array, names: tuple[str, ...]) -> np.ndarray:
    """Jagged branches as one float32 table [total entries, len(names)]."""
    return np.column_stack([ak.to_numpy(ak.flatten(arrays[name])).astype(np.float32) for name in names])


def _entry_lengths(path: Path, arrays: ak.Array, first_entry: int) -> tuple[np.ndarray, np.ndarray]:
    """Hits and muons per entry, after checking that every branch of a group agrees on them."""
    lengths = []
    for names in (HIT_FEATURES, TRACK_FEATURES):
        counts = ak.to_numpy(ak.num(arrays[names[-1]])).astype(np.int64)
        for name in names:
            mine = ak.to_numpy(ak.num(arrays[name]))
            if not np.array_equal(mine, counts):
                entry = first_entry + int(np.argmax(mine != counts))
                raise RootFileError(
                    f"{path}: entry {entry}: branch {name} has a different length from {names[-1]}"
                )
        lengths.append(counts)
    return lengths[0], lengths[1]


def apply_cuts(path: Path, arrays: ak.Array, cuts: Cuts, first_entry: int = 0) -> tuple[Events, Counts]:
    """The events of a block of entries (from `first_entry` of `path`) that pass `cuts`, relabelled and
    renumbered, and what the cuts removed. Takes `arrays` over: it is freed as soon as it is copied
    into flat tables (pile-up events are large)."""
    hit_counts, muon_counts = _entry_lengths(path, arrays, first_entry)
    all_numbers = ak.to_numpy(arrays[root_layout.EVENT_NUMBER])
    hits = _flat(arrays, HIT_FEATURES)
    muons = _flat(arrays, TRACK_FEATURES)
    del arrays
    n_events = len(hit_counts)
    event = np.repeat(np.arange(n_events), hit_counts)
    muon_event = np.repeat(np.arange(n_events), muon_counts)
    muon_start = np.concatenate([[0], np.cumsum(muon_counts)])[:-1]

    link = hits[:, _LINK].astype(np.int64)
    bad = (link < NOISE_LINK) | (link >= muon_counts[event])
    if bad.any():
        i = int(np.argmax(bad))
        raise RootFileError(
            f"{path}: entry {first_entry + event[i]}: {TRUTH_LINK}={link[i]} but the entry has "
            f"{muon_counts[event[i]]} "
            "truthMuon entries"
        )
    linked = link >= 0
    muon_of_hit = np.where(linked, muon_start[event] + link, -1)
    seen = np.bincount(muon_of_hit[linked], minlength=len(muons)) > 0

    kept_hit = ~np.isin(hits[:, _TECHNOLOGY], cuts.excluded_technologies())
    hits_left = np.bincount(muon_of_hit[linked & kept_hit], minlength=len(muons))
    failing = {
        "pt": seen & (muons[:, _PT] < cuts.pt_threshold),
        "eta": seen & (np.abs(muons[:, _ETA]) > cuts.eta_threshold),
        "num_hits": seen & (hits_left < cuts.num_hits_threshold),
    }
    kept_muon = seen & ~(failing["pt"] | failing["eta"] | failing["num_hits"])

    muons_per_event = np.bincount(muon_event[kept_muon], minlength=n_events)
    has_hits = np.bincount(event[kept_hit], minlength=n_events) > 0
    kept_event = has_hits & (muons_per_event > 0)

    # renumber the kept muons 0..n-1 within their event, in their original order
    first_of_event = np.concatenate([[0], np.cumsum(muons_per_event)])[:-1]
    new_index = np.cumsum(kept_muon) - 1 - first_of_event[muon_event]
    on_kept_muon = linked.copy()
    on_kept_muon[linked] = kept_muon[muon_of_hit[linked]]
    hits[:, _LINK] = NOISE_LINK
    hits[on_kept_muon, _LINK] = new_index[muon_of_hit[on_kept_muon]]

    rows = kept_hit & kept_event[event]
    out_hits, out_event = hits[rows], event[rows]
    del hits
    out_tracks, out_muon_event = muons[kept_muon], muon_event[kept_muon]
    kept_ids = np.flatnonzero(kept_event)
    numbers = all_numbers[kept_ids]
    if len(numbers) and numbers.max() > np.iinfo(np.int64).max:
        raise RootFileError(
            f"{path}: {root_layout.EVENT_NUMBER} {numbers.max()} does not fit the layout's int64"
        )
    events = Events(
        hits=np.split(out_hits, np.searchsorted(out_event, kept_ids)[1:]),
        tracks=np.split(out_tracks, np.searchsorted(out_muon_event, kept_ids)[1:]),
        numbers=numbers.astype(np.int64),
    )
    counts = Counts(
        events_seen=n_events,
        events_kept=len(kept_ids),
        events_dropped={"no_hits": int((~has_hits).sum()), "no_muon": int((has_hits & ~kept_event).sum())},
        muons_seen=int(seen.sum()),
        muons_kept=int(kept_muon.sum()),
        muons_dropped=int((seen & ~kept_muon).sum()),
        muons_failing={name: int(mask.sum()) for name, mask in failing.items()},
        hits_kept=len(out_hits),
    )
    return events, counts


@dataclass
class FileResult:
    """A prepared source file: its data files (name, events; none when no event passed) and counts."""

    source: Path
    files: list[tuple[str, int]]
    counts: Counts
    worker_id: int


_worker_id = 0


def _number_workers(counter: mp.Value) -> None:
    """Pool initializer: give each worker process a small id for `chunk_summary.worker_id`."""
    global _worker_id
    with counter.get_lock():
        _worker_id = counter.value
        counter.value += 1


def prepare_file(
    source: Path, tmp_dir: Path, cuts: Cuts, compression: str | None, events_per_file: int
) -> FileResult:
    """Read, cut and write one ROOT file, block by block of `events_per_file` entries, as
    `data/<stem>_<block>.h5` inside the dataset being written (blocks without events are not written)."""
    files, total = [], Counts()
    try:
        with open_tree(source) as tree:
            for block, start in enumerate(range(0, tree.num_entries, events_per_file)):
                # the block goes straight to apply_cuts, which frees it once copied: one block in memory
                events, counts = apply_cuts(
                    source, read_block(source, tree, start, start + events_per_file), cuts, start
                )
                total.add(counts)
                if counts.events_kept:
                    name = f"data/{source.stem}_{block:04d}.h5"
                    write_event_file(
                        tmp_dir / name,
                        events.hits,
                        events.tracks,
                        events.numbers,
                        hit_features=HIT_FEATURES,
                        track_features=TRACK_FEATURES,
                        compression=compression,
                    )
                    files.append((name, counts.events_kept))
    except RootFileError:  # a file failing part-way leaves none of its blocks in the dataset
        for name, _ in files:
            (tmp_dir / name).unlink()
        raise
    return FileResult(source, files, total, _worker_id)


def _results(sources: list[Path], tmp_dir: Path, workers: int, *task: object):
    """(source, FileResult or RootFileError) per file, as they finish; other errors propagate.
    `task`: prepare_file's arguments after the directory."""
    if workers == 1:
        for source in sources:
            try:
                yield source, prepare_file(source, tmp_dir, *task)
            except RootFileError as err:
                yield source, err
        return
    context = mp.get_context("spawn")  # a clean interpreter per worker, whatever the caller imported
    with ProcessPoolExecutor(
        workers, mp_context=context, initializer=_number_workers, initargs=(context.Value("i", 0),)
    ) as pool:
        pending = {pool.submit(prepare_file, source, tmp_dir, *task): source for source in sources}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    source = pending.pop(future)
                    err = future.exception()
                    if err is not None and not isinstance(err, RootFileError):
                        raise err
                    yield source, err or future.result()
        finally:
            for future in pending:
                future.cancel()


def prepare_root(
    input_dir: str | Path,
    output_dir: str | Path,
    cuts: Cuts | None = None,
    workers: int = 1,
    on_error: str = "fail",
    compression: str | None = "gzip",
    events_per_file: int = EVENTS_PER_FILE,
    progress: bool = True,
) -> Path:
    """Prepare every `*.root` file of `input_dir` into a dataset at `output_dir`; return its path.
    `compression`: "gzip" as the reference's stage-1 files, or None (chunked per event: about 2.4x
    larger, written and read several times faster). Each source file is read and written in blocks
    of `events_per_file` entries, one `data/<stem>_<block>.h5` each."""
    cuts = cuts or Cuts()
    input_dir, output_dir = Path(input_dir), Path(output_dir)
    if on_error not in ON_ERROR:
        raise UserError(f"on_error={on_error!r} must be one of {list(ON_ERROR)}")
    if workers < 1 or events_per_file < 1:
        raise UserError(f"workers={workers} and events_per_file={events_per_file} must be at least 1")
    sources = sorted(input_dir.glob("*.root"))
    if not sources:
        raise UserError(f"{input_dir}: no *.root files")
    if output_dir.exists():
        raise UserError(f"{output_dir} already exists; remove it or choose another --output")

    total, results, skipped = Counts(), {}, []
    with (
        DatasetWriter(output_dir, processing_parameters=asdict(cuts), source="") as writer,
        tqdm(total=len(sources), desc="preparing", unit="file", disable=not progress) as bar,
    ):
        for source, result in _results(
            sources, writer.tmp_dir, min(workers, len(sources)), cuts, compression, events_per_file
        ):
            if isinstance(result, RootFileError):
                if on_error == "fail":
                    raise result
                skipped.append({"file": str(source), "error": str(result)})
            else:
                results[source] = result
                total.add(result.counts)
            bar.update()
            bar.set_postfix(events=total.events_kept)
        if not total.events_kept:
            raise UserError(
                f"{input_dir}: no event passed the cuts ({total.events_seen} events in "
                f"{len(results)} readable files, {len(skipped)} skipped)"
            )
        for source in sources:  # input order, whatever order the workers finished in
            result = results.get(source)
            for name, events in result.files if result is not None else ():
                writer.add_file(name, events, str(source), result.worker_id)
        writer.processing_summary = {
            "files_seen": len(sources),
            "files_prepared": len(results),
            "files_skipped": skipped,
            **asdict(total),
        }
    return output_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `muonreg-prepare root` (defaults: the reference's)."""
    defaults = Cuts()
    parser.add_argument("--input", type=Path, required=True, help="directory of ATLAS hit-dump *.root files")
    parser.add_argument("--output", type=Path, required=True, help="dataset directory to create")
    parser.add_argument(
        "--workers", type=int, default=1, help="worker processes, one ROOT file each at a time"
    )
    parser.add_argument(
        "--pt-threshold", type=float, default=defaults.pt_threshold, help="minimum muon pT, GeV"
    )
    parser.add_argument(
        "--eta-threshold", type=float, default=defaults.eta_threshold, help="maximum muon |eta|"
    )
    parser.add_argument(
        "--num-hits-threshold", type=int, default=defaults.num_hits_threshold, help="minimum hits per muon"
    )
    parser.add_argument("--no-NSW", action="store_true", help="remove sTGC and MM hits")
    parser.add_argument("--no-RPC", action="store_true", help="remove RPC hits")
    parser.add_argument(
        "--on-error",
        choices=ON_ERROR,
        default="fail",
        help="an unreadable ROOT file stops the run (fail) or is skipped, named at the end and listed in "
        "metadata.yaml (skip)",
    )
    parser.add_argument(
        "--uncompressed",
        action="store_true",
        help="chunked, uncompressed HDF5 (faster, ~2.4x larger than gzip)",
    )


def report_skipped(dataset: Path) -> None:
    """Name the files `--on-error skip` left out, and how many, on stderr (they are also in the metadata)."""
    summary = read_metadata(dataset)["processing_summary"]
    skipped = summary["files_skipped"]
    if skipped:
        print(
            f"skipped {len(skipped)} of {summary['files_seen']} ROOT files (--on-error skip; also in "
            f"{dataset / METADATA}, processing_summary.files_skipped):",
            file=sys.stderr,
        )
        for entry in skipped:
            print(f"  {entry['file']}: {entry['error']}", file=sys.stderr)


def run(args: argparse.Namespace) -> Path:
    """`muonreg-prepare root` with parsed `args`; user errors leave as one line naming the problem."""
    cuts = Cuts(args.pt_threshold, args.eta_threshold, args.num_hits_threshold, args.no_NSW, args.no_RPC)
    with exit_on_user_errors():
        compression = None if args.uncompressed else "gzip"
        dataset = prepare_root(args.input, args.output, cuts, args.workers, args.on_error, compression)
    report_skipped(dataset)
    return dataset
