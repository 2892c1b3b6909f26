"""layerlie: how equivariant is an image model, and which layers break it."""

from layerlie.ablation import Ablation, ablate, list_variants
from layerlie.aliasing import aliasing, with_aliasing
from layerlie.attribution import Attribution, attribute
from layerlie.data import Images, images, photo_batch, photos
from layerlie.errors import LayerlieError
from layerlie.groups import Group, group, list_groups, load_groups, parse_group, register_group, resolve_groups
from layerlie.lie import lee, lie_derivative, summarize
from layerlie.models import load_model
from layerlie.ops import Op, get_op, list_ops, register_op
from layerlie.propagate import Propagator, propagate, register_rule
from layerlie.surgery import antialias, list_policies, register_policy
from layerlie.trace import trace
from layerlie.layout import Layout, infer_layouts
from layerlie.tangent import IMAGE, Frame, list_schemes, register_scheme, tangent

__all__ = [
    "antialias", "list_policies", "register_policy", "Ablation", "ablate", "list_variants", "aliasing", "with_aliasing",
    "IMAGE", "Attribution", "Layout", "attribute", "infer_layouts", "Frame", "Group", "Images", "LayerlieError", "group", "images", "lee", "lie_derivative", "list_groups",
    "list_schemes", "load_groups", "load_model", "parse_group", "photo_batch", "photos", "Propagator", "propagate", "register_rule", "trace", "register_group", "register_scheme", "resolve_groups", "summarize", "tangent",
    "Op", "get_op", "list_ops", "register_op",
]
