"""The reconstruction's estimate of the muon energy lost in the calorimeters, and its calibration.

A standalone spectrometer track measures the momentum after the calorimeters; the vertex momentum
needs the loss added back. Like the experiments' parametrised loss, ours is calibrated once on
simulated muons (not per event): the median loss in bins of |eta| and of the spectrometer
momentum, interpolated linearly in (|eta|, ln p). The table is `energy_loss.json`, written by

    python -m muonreg.reco.energy_loss --muons 2000000

and stamped with the simulator version it was made with (a test fails when they differ).
"""

from __future__ import annotations

import argparse
import functools
import json
from pathlib import Path

import numpy as np
from scipy.interpolate import RegularGridInterpolator

TABLE = Path(__file__).with_name("energy_loss.json")
ETA_EDGES = np.linspace(0.0, 2.7, 10)
LOG_P_EDGES = np.linspace(np.log(1.5), np.log(2000.0), 15)


@functools.cache
def _table() -> tuple[RegularGridInterpolator, int]:
    data = json.loads(TABLE.read_text())
    grid = (np.asarray(data["abs_eta_centres"]), np.asarray(data["log_p_centres"]))
    interpolate = RegularGridInterpolator(
        grid, np.asarray(data["median_loss"]), bounds_error=False, fill_value=None
    )
    return interpolate, int(data["simulator_version"])


def calibration_version() -> int:
    """The simulator version the table was calibrated with."""
    return _table()[1]


def expected_loss(p_ms: np.ndarray, eta: np.ndarray) -> np.ndarray:
    """Median calorimeter energy loss (GeV) of a muon measured with momentum `p_ms` after it, at `eta`."""
    interpolate = _table()[0]
    grid = interpolate.grid
    x = np.clip(np.abs(eta), grid[0][0], grid[0][-1])
    y = np.clip(np.log(np.maximum(p_ms, 1e-3)), grid[1][0], grid[1][-1])
    return interpolate(np.stack([x, y], -1))


def calibrate(muons: int, seed: int = 20261125) -> dict:
    """Median loss in (|eta|, ln p after the calorimeters) bins from simulated muons (flat in eta and
    ln p, which is what the table is conditioned on), ready for `energy_loss.json`."""
    from muonreg.data.simulate import SimulationConfig, energy_loss
    from muonreg.versions import SIMULATOR_VERSION

    rng = np.random.default_rng(seed)
    eta = rng.uniform(-2.7, 2.7, muons)
    p = np.exp(rng.uniform(np.log(2.0), np.log(2500.0), muons))
    loss = energy_loss(rng, p, eta, SimulationConfig())
    p_ms = p - loss
    kept = p_ms > 1.5
    i = np.digitize(np.abs(eta[kept]), ETA_EDGES) - 1
    j = np.digitize(np.log(p_ms[kept]), LOG_P_EDGES) - 1
    table = np.full((len(ETA_EDGES) - 1, len(LOG_P_EDGES) - 1), np.nan)
    for a in range(table.shape[0]):
        for b in range(table.shape[1]):
            sel = (i == a) & (j == b)
            if sel.sum() >= 50:
                table[a, b] = np.median(loss[kept][sel])
    if np.isnan(table).any():
        raise RuntimeError("empty calibration bins: raise --muons")
    return {
        "simulator_version": SIMULATOR_VERSION,
        "command": f"python -m muonreg.reco.energy_loss --muons {muons}",
        "abs_eta_centres": ((ETA_EDGES[1:] + ETA_EDGES[:-1]) / 2).round(4).tolist(),
        "log_p_centres": ((LOG_P_EDGES[1:] + LOG_P_EDGES[:-1]) / 2).round(4).tolist(),
        "median_loss": table.round(4).tolist(),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Calibrate the calorimeter energy-loss table on simulation.")
    parser.add_argument("--muons", type=int, default=2_000_000)
    parser.add_argument("--out", type=Path, default=TABLE)
    args = parser.parse_args(argv)
    table = calibrate(args.muons)
    rows = ",\n  ".join(json.dumps(row) for row in table.pop("median_loss"))
    fields = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in table.items()]
    args.out.write_text("{\n " + ",\n ".join(fields) + f',\n "median_loss": [\n  {rows}\n ]\n}}\n')
    print(args.out)


if __name__ == "__main__":
    main()
