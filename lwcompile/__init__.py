"""lwcompile: compile PyTorch image-restoration networks into lightweight variants.

    light = lwcompile.lighten(model)          # an ordinary nn.Module
    print(light.lwcompile_report)             # what changed, what was refused, and why
"""

from __future__ import annotations

from .api import (
    ExcludeGuard,
    LwCompileWarning,
    default_guards,
    default_rules,
    lighten,
    plan,
)
from .cost import count_macs, count_params, random_inputs
from .data import HELD_OUT, TRAIN, add_noise, batches, downscale, load_folder, load_images
from .distill import FitErrors, distill, init_layerwise
from .emit import emit_fast
from .errors import (
    CompileFailed,
    ExampleInputError,
    LwCompileError,
    NotAModuleError,
    NothingToLighten,
    RuleError,
    UntraceableError,
    VerificationError,
)
from .export import export_onnx, export_program
from .flow import DataFlow, is_depthwise, record_flow, structure_key
from .html_report import write_html
from .mobile import export_mobile
from .modules import GSAT, LIST, PointwiseOverParts, Resize
from .persist import PersistError, SaveFileError, WrongArchitectureError, info, load, save
from .profile import profile
from .report import Report, Row, Summary
from .rule import Guard, Match, NoMatch, Proposal, Refuse, Rule, Site, Veto

__all__ = [
    "GSAT", "LIST", "DataFlow", "PointwiseOverParts", "Resize", "count_macs", "count_params",
    "is_depthwise", "random_inputs", "record_flow", "structure_key", "ExampleInputError", "Guard",
    "LwCompileError", "Match", "NoMatch",
    "NotAModuleError", "Proposal", "Refuse", "Report", "Row", "Rule", "RuleError", "Site",
    "Summary",
    "UntraceableError", "Veto", "VerificationError", "default_guards", "default_rules",
    "lighten", "plan", "ExcludeGuard", "LwCompileWarning", "CompileFailed",
    "NothingToLighten", "HELD_OUT", "TRAIN", "add_noise", "batches", "downscale",
    "load_folder", "load_images", "FitErrors", "distill", "init_layerwise",
    "PersistError", "SaveFileError", "WrongArchitectureError", "info", "load", "save",
    "write_html", "emit_fast", "export_onnx", "export_program", "export_mobile", "profile",
]


