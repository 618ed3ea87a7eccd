"""The reference preparation's event cuts (hepattn `atlas_muon/prep_events_multiprocess.py`), on flat
numpy tables: what `muonreg-prepare root` applies to ATLAS hit dumps and the pile-up simulator to
its events, so that both make the same filter dataset.

In each event: hits of excluded technologies are removed (an event left without hits is dropped);
a truth muon with hits fails if pT < pt_threshold, |eta| > eta_threshold or it keeps fewer than
num_hits_threshold hits, and its hits become background (truthLink -1); the remaining muons are
renumbered 0..n-1 in their original order and are the event's tracks; an event left without a
muon is dropped. Truth muons without a single hit are not muons of the event.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import numpy as np

from muonreg.data.schema import HIT_FEATURES, NOISE_LINK, TRACK_FEATURES, TRUTH_LINK, Technology

_LINK = HIT_FEATURES.index(TRUTH_LINK)
_TECHNOLOGY = HIT_FEATURES.index("spacePoint_technology")
_PT, _ETA = TRACK_FEATURES.index("truthMuon_pt"), TRACK_FEATURES.index("truthMuon_eta")


class TruthLinkError(ValueError):
    """A hit's truthLink names a muon its event does not have."""

    def __init__(self, entry: int, link: int, muons: int):
        super().__init__(f"entry {entry}: {TRUTH_LINK}={link} but the entry has {muons} truthMuon entries")


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
    """Events that pass the cuts, per event (schema column order); `kept`: their positions in the input."""

    hits: list[np.ndarray]
    tracks: list[np.ndarray]
    kept: np.ndarray


def apply_cuts(
    hits: np.ndarray,
    hit_counts: np.ndarray,
    muons: np.ndarray,
    muon_counts: np.ndarray,
    cuts: Cuts,
    first_entry: int = 0,
) -> tuple[Events, Counts]:
    """Cut events given as flat tables: `hits` [sum(hit_counts), 20] and `muons` [sum(muon_counts), 4]
    in schema order, event after event. `hits` is relabelled in place. Raises TruthLinkError naming
    the event as `first_entry` + its position."""
    n_events = len(hit_counts)
    event = np.repeat(np.arange(n_events), hit_counts)
    muon_event = np.repeat(np.arange(n_events), muon_counts)
    muon_start = np.concatenate([[0], np.cumsum(muon_counts)])[:-1]

    link = hits[:, _LINK].astype(np.int64)
    bad = (link < NOISE_LINK) | (link >= muon_counts[event])
    if bad.any():
        i = int(np.argmax(bad))
        raise TruthLinkError(first_entry + int(event[i]), int(link[i]), int(muon_counts[event[i]]))
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
    out_tracks, out_muon_event = muons[kept_muon], muon_event[kept_muon]
    kept_ids = np.flatnonzero(kept_event)
    events = Events(
        hits=np.split(out_hits, np.searchsorted(out_event, kept_ids)[1:]),
        tracks=np.split(out_tracks, np.searchsorted(out_muon_event, kept_ids)[1:]),
        kept=kept_ids,
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
