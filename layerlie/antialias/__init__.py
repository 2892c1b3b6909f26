"""Remedies (docs/design.md §1): anti-aliased substitutes put in by graph surgery, and the
before/after ablation."""

from layerlie.antialias.ablation import Ablation, ablate, get_variant, list_variants, register_variant
from layerlie.antialias.filters import MAX_FILTER_SIZE, binomial
from layerlie.antialias.layers import BlurPool2d, FilteredActivation, PolyphaseSample, Resampled
from layerlie.antialias.policies import Options, Policy, get_policy, list_policies, register_policy
from layerlie.antialias.rewrite import NothingToReplace, Replacement, Where, antialias

__all__ = [
    "Ablation", "ablate", "get_variant", "list_variants", "register_variant",
    "MAX_FILTER_SIZE", "binomial",
    "BlurPool2d", "FilteredActivation", "PolyphaseSample", "Resampled",
    "Options", "Policy", "get_policy", "list_policies", "register_policy",
    "NothingToReplace", "Replacement", "Where", "antialias",
]
