"""The flat ROOT tree of the ATLAS muon hit dump, as the reference preparation reads it.

The dump (athena's `MuonR4::MlHitDumperAlg`) writes one tree, `MuonHitDump`, with one entry per
event: jagged per-hit branches `spacePoint_*`, jagged per-muon branches `truthMuon_*` and the
scalar `eventNumber`. The reference preparation reads the *first* tree of each file, the 20 hit
columns of `schema.HIT_FEATURES`, four muon columns and `eventNumber`; a hit's
`spacePoint_truthLink` is the index of its muon in that entry's `truthMuon_*` arrays, -1 for
background. Element types follow the athena tester-tree branches (see the README); uproot writes
the jagged columns as variable-length leaves sharing one counter per group (`nspacePoint`,
`ntruthMuon`), which read back exactly like the dump's std::vector branches.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import awkward as ak
import numpy as np
import uproot

from muonreg.data.schema import HIT_FEATURES, TRACK_FEATURES

TREE = "MuonHitDump"
HIT_GROUP, MUON_GROUP = "spacePoint", "truthMuon"
EVENT_NUMBER = "eventNumber"

# Element type of every hit branch, in schema (HIT_FEATURES) order.
_INTEGER_HIT_TYPES = {
    "spacePoint_readOutSide": np.int8,
    "spacePoint_channel": np.uint16,
    "spacePoint_layer": np.uint8,
    "spacePoint_stationPhi": np.uint8,
    "spacePoint_stationEta": np.int8,
    "spacePoint_stationIndex": np.uint8,
    "spacePoint_technology": np.uint8,
    "spacePoint_truthLink": np.int8,
}
HIT_BRANCH_TYPES: dict[str, type] = {name: _INTEGER_HIT_TYPES.get(name, np.float32) for name in HIT_FEATURES}
MUON_BRANCH_TYPES: dict[str, type] = {
    "truthMuon_pt": np.float32,  # GeV
    "truthMuon_eta": np.float32,
    "truthMuon_phi": np.float32,
    "truthMuon_q": np.int32,
}
EVENT_NUMBER_TYPE = np.uint64
assert tuple(MUON_BRANCH_TYPES) == TRACK_FEATURES


def _grouped(group: str, types: dict[str, type], rows: np.ndarray, counts: np.ndarray) -> ak.Array:
    """Columns of `rows` [n, len(types)] as jagged fields of one record, split per entry by `counts`."""
    fields = {
        name.removeprefix(group + "_"): ak.unflatten(rows[:, i].astype(dtype), counts)
        for i, (name, dtype) in enumerate(types.items())
    }
    return ak.zip(fields)


def write_tree(
    path: str | os.PathLike,
    hits: Sequence[np.ndarray],
    tracks: Sequence[np.ndarray],
    event_numbers: Sequence[int],
    rntuple: bool = False,
) -> None:
    """Write events (hits [n, 20] in HIT_FEATURES order, tracks [k, 4] in TRACK_FEATURES order)
    as one `MuonHitDump` TTree, or with `rntuple` an RNTuple (the format ATLAS writes from Run 4)
    whose fields are named as the tree's branches, each a vector per event."""
    hit_rows = np.concatenate(hits) if len(hits) else np.zeros((0, len(HIT_FEATURES)), np.float32)
    muon_rows = np.concatenate(tracks) if len(tracks) else np.zeros((0, len(TRACK_FEATURES)), np.float32)
    data = {
        HIT_GROUP: _grouped(HIT_GROUP, HIT_BRANCH_TYPES, hit_rows, np.array([len(h) for h in hits])),
        MUON_GROUP: _grouped(MUON_GROUP, MUON_BRANCH_TYPES, muon_rows, np.array([len(t) for t in tracks])),
        EVENT_NUMBER: np.asarray(event_numbers, dtype=EVENT_NUMBER_TYPE),
    }
    if rntuple:
        fields = {
            f"{group}_{field}": data[group][field]
            for group in (HIT_GROUP, MUON_GROUP)
            for field in data[group].fields
        }
        with uproot.recreate(path) as f:
            f.mkrntuple(TREE, {**fields, EVENT_NUMBER: data[EVENT_NUMBER]})
        return
    with uproot.recreate(path) as f:
        f.mktree(
            TREE,
            {
                name: (value.type if isinstance(value, ak.Array) else value.dtype)
                for name, value in data.items()
            },
        )
        f[TREE].extend(data)
