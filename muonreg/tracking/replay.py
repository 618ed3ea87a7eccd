"""Write what a run could not record to MLflow: `python -m muonreg.tracking.replay BUFFER [...]`.

A run whose tracking store stopped accepting writes keeps the records in its run directory
(`tracking-buffer.jsonl`) and says so at its end. Once the store is back, this applies them, in
order, to the run and store named in the file (or --tracking-uri); points the store already holds
are skipped, so replaying twice, or after a partial replay, records nothing twice.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from muonreg.errors import exit_on_user_errors, root_cause
from muonreg.tracking.records import RecordBuffer, describe, replay
from muonreg.tracking.store import TrackingError, connect, quiet_store_logs


def replay_file(path: Path, tracking_uri: str | None = None) -> str:
    """Replay a buffer file; return what was written, in words."""
    if not path.is_file():
        raise TrackingError(f"{path}: no such buffer file (nothing left to replay?)")
    buffer = RecordBuffer.open(path)
    buffer.uri = tracking_uri or buffer.uri
    records = buffer.records()
    client = connect(buffer.uri)
    try:
        replay(client, buffer)
    except Exception as err:
        raise TrackingError(
            f"replaying {path} into {buffer.uri} stopped ({root_cause(err)}); what is left stays in the file"
        ) from err
    return describe(records) or "nothing"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m muonreg.tracking.replay", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "buffers", type=Path, nargs="+", help="tracking-buffer.jsonl files of run directories"
    )
    parser.add_argument("--tracking-uri", help="the store to write to (default: the one named in the file)")
    args = parser.parse_args(argv)
    with exit_on_user_errors(), quiet_store_logs():  # a store still refusing writes: our one line
        for path in args.buffers:
            written = replay_file(path, args.tracking_uri)
            print(f"{path}: replayed {written}")


if __name__ == "__main__":
    main()
