"""Which ops of a lowered ExecuTorch program XNNPACK runs, and which fall back to portable
kernels: read from the lowered program itself, so it is what the ``.pte`` does.

A light network only pays off on a phone if its cheap ops run inside the XNNPACK delegate: an
op left to a portable kernel runs single-threaded and splits the delegate in two.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch
from torch.fx.node import map_arg
from torch.utils.flop_counter import flop_registry


@dataclass
class DelegationReport:
    """Which ops of a lowered program XNNPACK runs, and which fall back to portable kernels.

    Ops are counted as edge-dialect ops before XNNPACK fuses anything (a BatchNorm folded into
    its conv still counts as one delegated op); MACs use ``torch.utils.flop_counter`` formulas,
    as ``lwcompile.count_macs`` does.
    """

    delegated: dict[str, int]  # op name -> how many run inside XNNPACK delegates
    portable: dict[str, int]  # op name -> how many run as portable kernels
    delegated_macs: int
    portable_macs: int
    partitions: int  # number of XNNPACK delegate calls; 1 = one uninterrupted subgraph

    @property
    def ops_delegated(self) -> int:
        return sum(self.delegated.values())

    @property
    def ops_portable(self) -> int:
        return sum(self.portable.values())

    @property
    def op_share(self) -> float:
        """Fraction of ops delegated (1.0 when the program has no ops at all)."""
        total = self.ops_delegated + self.ops_portable
        return self.ops_delegated / total if total else 1.0

    @property
    def mac_share(self) -> float:
        total = self.delegated_macs + self.portable_macs
        return self.delegated_macs / total if total else 1.0

    @property
    def fully_delegated(self) -> bool:
        return self.ops_portable == 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "delegated": dict(self.delegated), "portable": dict(self.portable),
            "ops_delegated": self.ops_delegated, "ops_portable": self.ops_portable,
            "delegated_macs": self.delegated_macs, "portable_macs": self.portable_macs,
            "op_share": round(self.op_share, 4), "mac_share": round(self.mac_share, 4),
            "partitions": self.partitions,
        }

    def __str__(self) -> str:
        names = sorted(set(self.delegated) | set(self.portable),
                       key=lambda n: (-self.delegated.get(n, 0) - self.portable.get(n, 0), n))
        width = max([len(n) for n in names] + [2])
        lines = [f"{'op':<{width}}  XNNPACK  portable"]
        lines += [f"{n:<{width}}  {self.delegated.get(n, 0):>7}  {self.portable.get(n, 0):>8}"
                  for n in names]
        lines.append(
            f"{self.ops_delegated}/{self.ops_delegated + self.ops_portable} ops "
            f"({self.op_share:.1%}) and {self.mac_share:.1%} of "
            f"{(self.delegated_macs + self.portable_macs) / 1e6:.1f}M MACs delegated to XNNPACK "
            f"in {self.partitions} partition{'s' * (self.partitions != 1)}"
        )
        return "\n".join(lines)


def delegation_report(program: Any) -> DelegationReport:
    """Count the ops (and MACs) inside XNNPACK delegate calls vs outside, in a lowered program.

    ``program`` is the ``ExportedProgram`` of ``to_edge_transform_and_lower(...)``: every
    ``executorch_call_delegate`` holds the subgraph it replaced (``original_module``), and
    every other op node is left to a portable kernel.
    """
    delegated: Counter[str] = Counter()
    portable: Counter[str] = Counter()
    macs = {"delegated": 0, "portable": 0}
    partitions = 0
    graph_module = program.graph_module
    for node in graph_module.graph.nodes:
        if node.op != "call_function" or node.target is operator.getitem:
            continue
        if node.target is torch.ops.higher_order.executorch_call_delegate:
            partitions += 1
            lowered = getattr(graph_module, node.args[0].target)
            for inner in lowered.original_module.graph.nodes:
                if inner.op == "call_function" and inner.target is not operator.getitem:
                    delegated[_op_name(inner.target)] += 1
                    macs["delegated"] += _node_macs(inner)
        else:
            portable[_op_name(node.target)] += 1
            macs["portable"] += _node_macs(node)
    return DelegationReport(dict(delegated), dict(portable), macs["delegated"],
                            macs["portable"], partitions)



def _op_name(target: Any) -> str:
    """'aten.convolution' for the edge op aten.convolution.default."""
    name = getattr(target, "__name__", str(target))
    return name.removesuffix(".default")


def _node_macs(node: torch.fx.Node) -> int:
    """MACs of one graph node from its recorded fake tensors (0 for ops without a formula)."""
    aten_op = getattr(node.target, "_op", node.target)  # edge op -> the aten op it wraps
    formula = flop_registry.get(getattr(aten_op, "_overloadpacket", None))
    if formula is None:
        return 0
    args = map_arg(node.args, lambda a: a.meta.get("val"))
    kwargs = map_arg(node.kwargs, lambda a: a.meta.get("val"))
    return int(formula(*args, out_val=node.meta.get("val"), **kwargs)) // 2
