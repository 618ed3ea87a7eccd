"""muonreg: MaskFormer muon tracking and track-parameter regression for the ATLAS Muon Spectrometer."""

__version__ = "0.1.0"
