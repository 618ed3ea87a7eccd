"""Physics and format versions: what keys the cached datasets and least-squares references.

A cache made by older physics must never be reused silently. Every change to the simulator or to
the reference fit bumps its version here; `tests/test_versions.py` fails until it does, by
comparing a digest of the code (its syntax tree: comments and formatting do not count) with the
digest recorded below. Update both together.
"""

SIMULATOR_VERSION = 3  # muonreg/detector.py, muonreg/data/simulate.py
FIT_VERSION = 9  # muonreg/detector.py, muonreg/reco/ (6: the same fits, spread over processes; 7: cores from
# muonreg.machine; 8: its numerical floors from muonreg.numerics, the same fits; 9: forkserver inside a joblib
# sweep's worker, the same fits)

SIMULATOR_DIGEST = "12a843c385c4be49"
FIT_DIGEST = "67cf7133445d64e1"
