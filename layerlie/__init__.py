"""layerlie: how equivariant is an image model, and which layers break it."""

import importlib
import sys
import warnings

from layerlie.antialias.ablation import Ablation, ablate, get_variant, list_variants, register_variant
from layerlie.measure.aliasing import aliasing, with_aliasing
from layerlie.measure.attribution import Attribution, attribute
from layerlie.measure.estimators import Estimator, get_estimator, list_estimators, register_estimator
from layerlie.model.data import Images, images, photo_batch, photos
from layerlie.errors import LayerlieError, Note
from layerlie.core.groups import (DEFAULT_GROUPS, Group, get_group, group, list_groups, load_groups, parse_group,
                                  register_group, resolve_groups)
from layerlie.core.layout import Layout, infer_layouts, unknown_layouts
from layerlie.measure.lie import jvp_ready, lee, lie_derivative, summarize
from layerlie.measure.metrics import (DEFAULT_METRICS, Metric, consistency, eq_r, eq_t, eq_t_frac, get_metric,
                                      invariance, list_metrics, metrics, register_metric)
from layerlie.model.loading import load_model
from layerlie.integrations.monitor import Monitor
from layerlie.model.normact import get_norm_act, list_norm_acts, register_norm_act
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
from layerlie.core.tangent import IMAGE, Frame, Scheme, get_scheme, list_schemes, register_scheme, tangent
from layerlie.model.trace import TraceError, trace, with_output

__all__ = [
    "Ablation", "ablate", "get_variant", "list_variants", "register_variant",
    "aliasing", "with_aliasing",
    "Attribution", "attribute", "get_layer_type", "list_layer_types", "register_layer_type",
    "Images", "images", "photo_batch", "photos",
    "LayerlieError", "Note",
    "DEFAULT_GROUPS", "Group", "get_group", "group", "list_groups", "load_groups", "parse_group", "register_group", "resolve_groups",
    "Layout", "infer_layouts", "unknown_layouts",
    "jvp_ready", "lee", "lie_derivative", "summarize",
    "Estimator", "get_estimator", "list_estimators", "register_estimator",
    "consistency", "eq_r", "eq_t", "eq_t_frac", "invariance", "metrics",
    "DEFAULT_METRICS", "Metric", "get_metric", "list_metrics", "register_metric",
    "load_model",
    "Monitor",
    "get_norm_act", "list_norm_acts", "register_norm_act",
    "Op", "get_op", "list_ops", "register_op",
    "Propagator", "get_rule", "list_rules", "propagate", "register_rule",
    "load",
    "report",
    "NothingToReplace", "antialias", "get_policy", "list_policies", "register_policy",
    "sweep",
    "get_measure", "list_measures", "register_measure",
    "get_figure", "list_figures", "register_figure",
    "IMAGE", "Frame", "Scheme", "get_scheme", "list_schemes", "register_scheme", "tangent",
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
    "jvprules": "core.rules",
    "layout": "core.layout",
    "lie": "measure.lie",
    "memory": "core.memory",
    "metrics": "measure.metrics",
    "models": "model.loading",
    "monitor": "integrations.monitor",
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
    _module = sys.modules.setdefault(f"layerlie.{_old}", importlib.import_module(f"layerlie.{_new}"))
    globals().setdefault(_old, _module)  # ``ll.store``; a public function of that name (``ll.metrics``) wins

_REPLACED = {"ESTIMATORS": "layerlie.list_estimators()", "CHECKS": "layerlie.get_estimator(name).check"}


def __getattr__(name: str) -> object:
    """``ESTIMATORS`` and ``CHECKS``, the constants that the estimator registry replaced, for
    one release."""
    if name not in _REPLACED:
        raise AttributeError(f"module 'layerlie' has no attribute {name!r}")
    warnings.warn(f"layerlie.{name} is deprecated; use {_REPLACED[name]}", DeprecationWarning, stacklevel=2)
    names = list_estimators()
    return tuple(names) if name == "ESTIMATORS" else {n: get_estimator(n).check for n in names}
