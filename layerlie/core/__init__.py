"""The mathematics every measurement shares (docs/design.md §1): groups and their tangents,
the op table, layouts, the tangent engine and the memory plan. Nothing here knows a model zoo."""

from layerlie.core import table  # the op table's entries, registered on import of any core module
