"""Results at scale (docs/design.md §1): sweep specs, the measures as a registry, sweeps over models
on Ray, the parquet store and its compaction, and the check of a spec before it runs (``check``)."""

from layerlie.results.measures import Measure, get_measure, list_measures, register_measure
from layerlie.results.spec import SpecError, read_spec
from layerlie.results.store import compact, load
from layerlie.results.sweep import sweep

__all__ = ["Measure", "get_measure", "list_measures", "register_measure", "SpecError", "read_spec", "load",
           "compact", "sweep"]
