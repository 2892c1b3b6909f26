"""What a reader sees (docs/design.md §1): the paper's figures, as a registry, and the HTML report."""

from layerlie.views.figures import Plot, get_figure, list_figures, register_figure
from layerlie.views.report import report

__all__ = ["Plot", "get_figure", "list_figures", "register_figure", "report"]
