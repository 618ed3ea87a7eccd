"""The MaskFormer tracker and its parts."""

from muonreg.models.maskformer import MaskFormer
from muonreg.models.matching import Matcher

__all__ = ["MaskFormer", "Matcher"]
