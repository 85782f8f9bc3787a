"""The concat-skip finder: the skip connections of U-Net style networks in a traced graph.

A channel concat whose inputs were produced at different depths of the graph (longest path
from the inputs, on a networkx view of it) joins an early feature map to a late one: a skip
connection. Rewrites of convs that consume one must keep the channel bookkeeping (which
input channels are which), so the report lists them (``concat_skips``).
"""

from __future__ import annotations

from dataclasses import dataclass

import networkx as nx
from torch import fx

from .fx_helpers import channel_concat_parts, node_shape


def to_networkx(graph: fx.Graph) -> nx.DiGraph:
    """Nodes are fx node names; an edge runs from each producer to each consumer."""
    g = nx.DiGraph()
    for node in graph.nodes:
        g.add_node(node.name, op=node.op, target=str(node.target))
        for producer in node.all_input_nodes:
            g.add_edge(producer.name, node.name)
    return g


def depths(g: nx.DiGraph) -> dict[str, int]:
    """Longest-path depth of every node from the graph's inputs."""
    depth: dict[str, int] = {}
    for name in nx.topological_sort(g):
        depth[name] = max((depth[p] + 1 for p in g.predecessors(name)), default=0)
    return depth


@dataclass(frozen=True)
class ConcatSkip:
    concat: str  # qualified name of the cat node
    inputs: tuple[str, ...]  # fx names of its inputs
    depths: tuple[int, ...]  # their depths: a spread means a skip
    channels: tuple[int, ...]


def concat_skips(graph: fx.Graph, prefix: str = "") -> list[ConcatSkip]:
    """Channel concats (dim 1 of 4-D tensors) whose inputs come from different depths."""
    g = to_networkx(graph)
    depth = depths(g)
    skips = []
    for node in graph.nodes:
        parts = channel_concat_parts(node)
        if parts is None:
            continue
        part_depths = tuple(depth[p.name] for p in parts)
        if len(set(part_depths)) > 1:
            name = f"{prefix}.{node.name}" if prefix else node.name
            skips.append(ConcatSkip(name, tuple(p.name for p in parts), part_depths,
                                    tuple(node_shape(p)[1] for p in parts)))
    return skips
