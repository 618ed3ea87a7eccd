"""The MaskFormer tracker, the hit filter, and their parts."""

from muonreg.models.hit_filter import HitFilter
from muonreg.models.maskformer import MaskFormer
from muonreg.models.matching import Matcher

__all__ = ["HitFilter", "MaskFormer", "Matcher"]
