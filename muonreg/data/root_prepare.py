"""ATLAS muon hit-dump ROOT files -> a dataset in the hepattn layout (the pre-filter "filter dataset").

    muonreg-prepare root --input DIR --output DIR [--workers N] [cuts] [--on-error fail|skip]

Follows the reference preparation (hepattn `atlas_muon/prep_events_multiprocess.py`): every
`*.root` file of DIR is read (its first TTree or RNTuple, see `root_layout`), one file per task, and its events
go through the reference's cuts (`muonreg.data.cuts`: technology removal, muon pT, |eta| and
hit-count cuts, renumbering; events without hits or muons dropped).
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
from dataclasses import asdict, dataclass
from pathlib import Path

import awkward as ak
import numpy as np
import uproot
from tqdm import tqdm

from muonreg.data import root_layout
from muonreg.data.cuts import Counts, Cuts, Events, TruthLinkError, apply_cuts
from muonreg.data.format import METADATA, DatasetWriter, read_metadata, write_event_file
from muonreg.data.schema import HIT_FEATURES, TRACK_FEATURES
from muonreg.errors import UserError, exit_on_user_errors

ON_ERROR = ("fail", "skip")
TREE_CLASSES = ("TTree", "ROOT::RNTuple", "ROOT::Experimental::RNTuple")
BRANCHES = [*HIT_FEATURES, *TRACK_FEATURES, root_layout.EVENT_NUMBER]
# Entries read, cut and written together (one data/*.h5 each): bounds a worker's memory, ~1 GB at PU200.
EVENTS_PER_FILE = 500


class RootFileError(UserError):
    """A ROOT file that cannot be prepared; the message names the file and the problem."""


def _first_tree(path: Path, file: uproot.ReadOnlyDirectory) -> uproot.TTree:
    """The file's first TTree or RNTuple (ATLAS writes RNTuple from Run 4): uproot reads both alike."""
    trees = [key for key, kind in file.classnames().items() if kind in TREE_CLASSES]
    if not trees:
        raise RootFileError(f"{path}: no TTree or RNTuple in the file (keys: {list(file.keys())})")
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


def cut_block(
    path: Path, arrays: ak.Array, cuts: Cuts, first_entry: int = 0
) -> tuple[Events, np.ndarray, Counts]:
    """The events of a block of entries (from `first_entry` of `path`) that pass `cuts`, relabelled and
    renumbered, their event numbers, and what the cuts removed. Takes `arrays` over: it is freed as
    soon as it is copied into flat tables (pile-up events are large)."""
    hit_counts, muon_counts = _entry_lengths(path, arrays, first_entry)
    all_numbers = ak.to_numpy(arrays[root_layout.EVENT_NUMBER])
    hits = _flat(arrays, HIT_FEATURES)
    muons = _flat(arrays, TRACK_FEATURES)
    del arrays
    try:
        events, counts = apply_cuts(hits, hit_counts, muons, muon_counts, cuts, first_entry)
    except TruthLinkError as err:
        raise RootFileError(f"{path}: {err}") from err
    numbers = all_numbers[events.kept]
    if len(numbers) and numbers.max() > np.iinfo(np.int64).max:
        raise RootFileError(
            f"{path}: {root_layout.EVENT_NUMBER} {numbers.max()} does not fit the layout's int64"
        )
    return events, numbers.astype(np.int64), counts


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
                # the block goes straight to cut_block, which frees it once copied: one block in memory
                events, numbers, counts = cut_block(
                    source, read_block(source, tree, start, start + events_per_file), cuts, start
                )
                total.add(counts)
                if counts.events_kept:
                    name = f"data/{source.stem}_{block:04d}.h5"
                    write_event_file(
                        tmp_dir / name,
                        events.hits,
                        events.tracks,
                        numbers,
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
