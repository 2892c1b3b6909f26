"""layerlie: how equivariant is an image model, and which layers break it."""

import importlib
import sys

from layerlie.antialias.ablation import Ablation, ablate, get_variant, list_variants, register_variant
from layerlie.measure.aliasing import aliasing, with_aliasing
from layerlie.measure.attribution import CHECKS, ESTIMATORS, Attribution, attribute
from layerlie.model.data import Images, images, photo_batch, photos
from layerlie.errors import LayerlieError, Note
from layerlie.core.groups import Group, get_group, group, list_groups, load_groups, parse_group, register_group, resolve_groups
from layerlie.core.layout import Layout, infer_layouts, unknown_layouts
from layerlie.measure.lie import jvp_ready, lee, lie_derivative, summarize
from layerlie.measure.metrics import consistency, eq_r, eq_t, eq_t_frac, invariance, metrics
from layerlie.model.loading import load_model
from layerlie.measure.monitor import Monitor
from layerlie.core.ops import (Op, get_layer_type, get_op, get_rule, list_layer_types, list_ops, list_rules,
                          register_layer_type, register_op, register_rule)
from layerlie.core.engine import Propagator, propagate
from layerlie.views.report import report
from layerlie.views.figures import get_figure, list_figures, register_figure
from layerlie.results.store import load
from layerlie.antialias.rewrite import NothingToReplace, antialias
from layerlie.antialias.policies import get_policy, list_policies, register_policy
from layerlie.results.sweep import sweep
from layerlie.results.measures import get_measure, list_measures, register_measure
from layerlie.core.tangent import IMAGE, Frame, get_scheme, list_schemes, register_scheme, tangent
from layerlie.model.trace import TraceError, trace, with_output

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
    "get_measure", "list_measures", "register_measure",
    "get_figure", "list_figures", "register_figure",
    "IMAGE", "Frame", "get_scheme", "list_schemes", "register_scheme", "tangent",
    "TraceError", "trace", "with_output",
]

# The module paths from before the stages had folders (``layerlie.lie`` is now
# ``layerlie.measure.lie``), kept importable for one release.
_MOVED = {
    "ablation": "antialias.ablation",
    "aliasing": "measure.aliasing",
    "attention": "core.attention",
    "attribution": "measure.attribution",
    "contract": "model.contract",
    "data": "model.data",
    "figures": "views.figures",
    "groups": "core.groups",
    "hooks": "measure.hooks",
    "jvprules": "core.jvprules",
    "layout": "core.layout",
    "lie": "measure.lie",
    "memory": "core.memory",
    "metrics": "measure.metrics",
    "models": "model.loading",
    "monitor": "measure.monitor",
    "normact": "model.normact",
    "ops": "core.ops",
    "probe": "core.probe",
    "propagate": "core.engine",
    "report": "views.report",
    "store": "results.store",
    "surgery": "antialias",
    "sweep": "results.sweep",
    "tangent": "core.tangent",
    "trace": "model.trace",
    "windows": "core.windows",
}
for _old, _new in _MOVED.items():
    sys.modules.setdefault(f"layerlie.{_old}", importlib.import_module(f"layerlie.{_new}"))
