"""Column names and codes of the hepattn ATLAS-muon layout (DESIGN section 2).

These are the names a writer uses and the names a reader looks up; the column *order* of a
dataset on disk always comes from its own `metadata.yaml`, never from the tuples below.
"""

from enum import IntEnum

HIT_FEATURES: tuple[str, ...] = (
    "spacePoint_globEdgeHighX",
    "spacePoint_globEdgeHighY",
    "spacePoint_globEdgeHighZ",
    "spacePoint_globEdgeLowX",
    "spacePoint_globEdgeLowY",
    "spacePoint_globEdgeLowZ",
    "spacePoint_time",
    "spacePoint_driftR",
    "spacePoint_readOutSide",
    "spacePoint_covXX",
    "spacePoint_covXY",
    "spacePoint_covYX",
    "spacePoint_covYY",
    "spacePoint_channel",
    "spacePoint_layer",
    "spacePoint_stationPhi",
    "spacePoint_stationEta",
    "spacePoint_stationIndex",
    "spacePoint_technology",
    "spacePoint_truthLink",
)

TRACK_FEATURES: tuple[str, ...] = ("truthMuon_pt", "truthMuon_eta", "truthMuon_phi", "truthMuon_q")

QPT = "truthMuon_qpt"  # derived target q/pT (GeV^-1): the signed curvature, not stored on disk
TRUTH_LINK = "spacePoint_truthLink"
NOISE_LINK = -1


class Technology(IntEnum):
    """`spacePoint_technology` codes."""

    MDT = 0
    CSC = 1
    RPC = 2
    TGC = 3
    STGC = 4
    MM = 5
