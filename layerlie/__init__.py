"""layerlie: how equivariant is an image model, and which layers break it."""

from layerlie.ablation import Ablation, ablate, get_variant, list_variants, register_variant
from layerlie.aliasing import aliasing, with_aliasing
from layerlie.attribution import CHECKS, ESTIMATORS, Attribution, attribute
from layerlie.data import Images, images, photo_batch, photos
from layerlie.errors import LayerlieError, Note
from layerlie.groups import Group, get_group, group, list_groups, load_groups, parse_group, register_group, resolve_groups
from layerlie.layout import Layout, infer_layouts, unknown_layouts
from layerlie.lie import jvp_ready, lee, lie_derivative, summarize
from layerlie.metrics import consistency, eq_r, eq_t, eq_t_frac, invariance, metrics
from layerlie.models import load_model
from layerlie.monitor import Monitor
from layerlie.ops import (Op, get_layer_type, get_op, get_rule, list_layer_types, list_ops, list_rules,
                          register_layer_type, register_op, register_rule)
from layerlie.propagate import Propagator, propagate
from layerlie.report import report
from layerlie.store import load
from layerlie.surgery import NothingToReplace, antialias, get_policy, list_policies, register_policy
from layerlie.sweep import sweep
from layerlie.tangent import IMAGE, Frame, get_scheme, list_schemes, register_scheme, tangent
from layerlie.trace import TraceError, trace, with_output

__all__ = [
    "Ablation", "ablate", "get_variant", "list_variants", "register_variant",
    "aliasing", "with_aliasing",
    "CHECKS", "ESTIMATORS", "Attribution", "attribute", "get_layer_type", "list_layer_types", "register_layer_type",
    "Images", "images", "photo_batch", "photos",
    "LayerlieError", "Note",
    "Group", "get_group", "group", "list_groups", "load_groups", "parse_group", "register_group", "resolve_groups",
    "Layout", "infer_layouts", "unknown_layouts",
    "jvp_ready", "lee", "lie_derivative", "summarize",
    "consistency", "eq_r", "eq_t", "eq_t_frac", "invariance", "metrics",
    "load_model",
    "Monitor",
    "Op", "get_op", "list_ops", "register_op",
    "Propagator", "get_rule", "list_rules", "propagate", "register_rule",
    "load",
    "report",
    "NothingToReplace", "antialias", "get_policy", "list_policies", "register_policy",
    "sweep",
    "IMAGE", "Frame", "get_scheme", "list_schemes", "register_scheme", "tangent",
    "TraceError", "trace", "with_output",
]
