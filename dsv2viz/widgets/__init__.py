"""Jupyter widgets over traces: put one last in a notebook cell to show it.

from dsv2viz.widgets import AttentionExplorer, LatentExplorer, RoutingExplorer
RoutingExplorer(trace)
"""

from .attention_explorer import AttentionExplorer
from .dashboard import GenerationDashboard
from .latent_explorer import LatentExplorer
from .routing_explorer import RoutingExplorer

__all__ = ["AttentionExplorer", "GenerationDashboard", "LatentExplorer", "RoutingExplorer"]
