"""The sector frame: where a hit sits as seen from the interaction point, and its neighbours there.

A muon from the interaction point crosses the spectrometer close to a straight line in the r-z plane
of its phi sector (the toroid turns it by tens of mrad at most), so its hits in every station share
the sector and the angle at which the vertex sees them, atan2(normal, z); a pile-up hit is a lone
tube or strip. Sorting an event's hits by (sector, pointing angle) puts a muon's hits side by side,
so the few hits before and after each one hold the rest of its chamber segment and its road through
the other stations. Both the learned hit filter (muonreg.models.neighbourhood) and the classical
road search (muonreg.reco.road_search) look at an event this way.

Computed from `hit_geometry` (muonreg.data.geometry) in float32: a muon's tubes differ by mrad.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from muonreg.data.geometry import G

N_SECTORS = 16
TUBE_TIME = 750.0  # ns: the drift window, the scale of a tube's time residual
STRIP_TIME = 25.0  # ns: half the trigger read-out window, the scale of a strip's time residual


def hit_frame(geometry: torch.Tensor, valid: torch.Tensor, timing: bool = True) -> dict[str, torch.Tensor]:
    """Per hit [b, m]: `sector` (0-15; -1 where the geometry is invalid), pointing `angle` from the
    vertex in the sector's r-z plane (rad), `depth` along the chamber normal (m: the radius of a
    barrel layer, |z| of an endcap one), `tube` (1 for MDT), scaled `time` residual (0 without timing)."""
    g = geometry.float()
    phi_s = torch.atan2(g[..., G["sin_phi_s"]], g[..., G["cos_phi_s"]])
    sector = torch.remainder(torch.round(phi_s / (2 * math.pi / N_SECTORS)), N_SECTORS).long()
    normal, z, tube = g[..., G["normal"]], g[..., G["z"]], g[..., G["mdt"]]
    residual = g[..., G["time_residual"]]
    time = torch.where(tube > 0, residual / TUBE_TIME, (residual / STRIP_TIME).clamp(-3.0, 3.0))
    return {
        "sector": torch.where(valid, sector, -1),
        "angle": torch.atan2(normal, z),
        "depth": torch.where(g[..., G["barrel"]] > 0, normal, z.abs()),
        "tube": tube,
        "time": time if timing else torch.zeros_like(time),
    }


def detector_order(frame: dict[str, torch.Tensor], hit_valid: torch.Tensor) -> torch.Tensor:
    """Per event, the hits sorted by (sector, pointing angle), padding last [b, m]."""
    key = frame["sector"].float() * 4 + frame["angle"]  # the angle is in [0, pi]
    return sort_order(key.masked_fill(~hit_valid, torch.inf))


def sort_order(key: torch.Tensor) -> torch.Tensor:
    """argsort along dim 1, stable (ties keep their order) except while exporting to ONNX, which
    has no stable sort; two real hits never share a key there, padding's order does not matter."""
    if torch.compiler.is_exporting():
        return torch.sort(key, dim=1).indices
    return torch.argsort(key, dim=1, stable=True)


def windows(x: torch.Tensor, k: int) -> torch.Tensor:
    """The 2k + 1 hits centred on each hit of a sorted sequence: x [b, m, ...] -> [b, m, 2k + 1, ...]
    (zeros beyond the ends); a strided view of the padded input, copied only when used."""
    if x.dtype == torch.bool:  # padding of booleans is not implemented on every device
        return windows(x.to(torch.uint8), k).bool()
    trailing = x.shape[2:]
    flat = x.reshape(*x.shape[:2], -1)
    padded = F.pad(flat, (0, 0, k, k))  # pads dim 1
    return padded.unfold(1, 2 * k + 1, 1).movedim(-1, 2).reshape(*x.shape[:2], 2 * k + 1, *trailing)
