"""The public types a rule or guard is written against.

A rule is a matcher plus a builder: ``match(site)`` answers ``Match`` or ``NoMatch(reason)``,
``build(match)`` returns the replacement ``nn.Module``. A guard sees the proposed rewrite
(match and built replacement) and answers ``None`` or ``Veto(reason)``. Neither ever touches
the model: the compiler applies, verifies and records.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.fx as fx
from torch import nn

from .tracing.flow import structure_key


@dataclass(frozen=True)
class Site:
    """One place a rule may rewrite: a leaf module call, with whatever context is known.

    ``node`` is the fx node calling the module when its region was traced, else ``None``
    (the module sits in code fx could not trace: its producers and consumers are unknown).
    """

    name: str
    module: nn.Module
    input_shapes: tuple[torch.Size, ...]
    output_shape: torch.Size | None
    node: fx.Node | None = None
    region: str = ""
    #: True when the graph around the node may be rewritten (not only the module swapped)
    graph_editable: bool = False
    #: the output reaches a pixel shuffle through pointwise ops only (seen in a real forward,
    #: so known even where tracing failed)
    feeds_pixel_shuffle: bool = False
    #: the upscale factor of that pixel shuffle (None when it feeds none)
    pixel_shuffle_factor: int | None = None
    #: the output reaches a channel concat (e.g. a U-Net skip) through pointwise ops only
    feeds_concat: bool = False
    #: reads a model input / writes the model's output with no other learned layer between
    #: (seen in a real forward); None where unknown
    reads_input: bool | None = None
    writes_output: bool | None = None

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the module computes in (its parameters'), for making test inputs."""
        param = next(self.module.parameters(), None)
        return param.dtype if param is not None else torch.float32

    @property
    def producers(self) -> list[fx.Node]:
        return list(self.node.all_input_nodes) if self.node is not None else []

    @property
    def consumers(self) -> list[fx.Node]:
        return list(self.node.users) if self.node is not None else []


@dataclass(frozen=True)
class Match:
    """A rule's claim on a site.

    ``nodes`` are the graph nodes the replacement stands in for (the last one's output is
    what the replacement produces); empty means "swap ``site.module`` only". ``inputs`` are
    what the replacement is called with, defaulting to the site's own inputs.
    """

    site: Site
    nodes: tuple[fx.Node, ...] = ()
    inputs: tuple[Any, ...] | None = None
    input_shapes: tuple[torch.Size, ...] | None = None
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def shapes(self) -> tuple[torch.Size, ...]:
        return self.input_shapes if self.input_shapes is not None else self.site.input_shapes


@dataclass(frozen=True)
class NoMatch:
    """Why a rule does not apply at a site: kept for the report's log."""

    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class Refuse:
    """The rule recognises its pattern here but cannot rewrite it (e.g. channels that do not
    split evenly). Unlike ``NoMatch`` this is a decision the report shows as a row."""

    reason: str

    def __bool__(self) -> bool:
        return False


@dataclass(frozen=True)
class Veto:
    """A guard's refusal, with the reason shown in the report."""

    reason: str


@dataclass(frozen=True)
class Proposal:
    """What a guard judges: the rule, its match and the replacement it built.

    ``replacement`` is ``None`` when the rule refused the site itself: a guard that speaks
    about the site alone (e.g. "keep image-facing layers") still gets to give its reason.
    """

    rule: Rule
    match: Match
    replacement: nn.Module | None

    @functools.cached_property
    def replacement_key(self) -> tuple:
        """The replacement's ``flow.structure_key``, computed once: guards and the compiler
        both cache work by it (identical replacements of twin sites share the work)."""
        return structure_key(self.replacement) if self.replacement is not None else ()


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


class Rule:
    """Base class of rewrite rules. Subclass as a ``@dataclass`` whose fields are parameters.

    ``applies_to`` filters sites by module type before ``match`` is asked; ``exact`` asks the
    compiler to check the replacement numerically against what it replaces, not only by shape.
    Lower ``priority`` runs first. ``for_image_layers`` says the rule was designed for the
    layers that read or write the image itself, so the image-boundary guard lets it through.
    """

    name: ClassVar[str] = ""
    applies_to: ClassVar[tuple[type[nn.Module], ...]] = (nn.Conv2d,)
    priority: ClassVar[int] = 100
    exact: ClassVar[bool] = False
    for_image_layers: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = _snake(cls.__name__.removesuffix("Rule"))

    def match(self, site: Site) -> Match | NoMatch | Refuse:
        raise NotImplementedError

    def build(self, match: Match) -> nn.Module:
        raise NotImplementedError

    def describe(self, replacement: nn.Module) -> str:
        """How the report names the replacement."""
        return type(replacement).__name__


class Guard:
    """Base class of guards: ``check`` returns ``None`` to allow, ``Veto(reason)`` to refuse."""

    name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not cls.__dict__.get("name"):
            cls.name = _snake(cls.__name__.removesuffix("Guard"))

    def check(self, proposal: Proposal) -> Veto | None:
        raise NotImplementedError
