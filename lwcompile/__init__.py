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
from .deploy.convert import convert
from .deploy.emit import emit_fast
from .deploy.export import export_onnx, export_program
from .deploy.file_errors import (
    NotSavableError,
    OriginalNeededError,
    ReplayError,
    UnknownRuleError,
    UntrustedFileError,
    WeightMismatchError,
)
from .deploy.int8 import CalibrationDataError, Int8Error, Int8QualityError, Int8Report
from .deploy.mobile import export_mobile
from .deploy.persist import PersistError, SaveFileError, WrongArchitectureError, info, load, save
from .deploy.tune import Tuned, TuneError, TuneReport, tune
from .errors import (
    ArgumentError,
    CheckpointError,
    CompileFailed,
    DestinationError,
    ExampleInputError,
    ExportError,
    LwCompileError,
    NotAModuleError,
    NothingToLighten,
    RuleError,
    TrainingError,
    UntraceableError,
    VerificationError,
)
from .html_report import write_html
from .measure.cost import count_macs, count_params, random_inputs
from .measure.profile import profile
from .nn import GSAT, LIST, DenseLIST, PointwiseOverParts, Resize
from .report import Report, Row, Summary
from .rule import Guard, Match, NoMatch, Proposal, Refuse, Rule, Site, Veto
from .tracing.flow import DataFlow, is_depthwise, record_flow, structure_key
from .tracing.fx_helpers import channel_concat_parts
from .train.data import HELD_OUT, TRAIN, add_noise, batches, downscale, load_folder, load_images
from .train.datasets import ImageFolder, PairedFolders
from .train.degradations import compose, gaussian_blur, jpeg
from .train.distill import distill
from .train.fitting import FitTask, register_fit
from .train.layerwise import FitErrors, init_layerwise
from .train.validation import Scores, validate

__all__ = [
    "tune", "Tuned", "TuneReport", "TuneError", "DenseLIST",
    "GSAT", "LIST", "DataFlow", "PointwiseOverParts", "Resize", "count_macs", "count_params",
    "is_depthwise", "random_inputs", "record_flow", "structure_key", "ExampleInputError", "Guard",
    "ExportError", "LwCompileError", "Match", "NoMatch",
    "NotAModuleError", "Proposal", "Refuse", "Report", "Row", "Rule", "RuleError", "Site",
    "Summary",
    "UntraceableError", "Veto", "VerificationError", "default_guards", "default_rules",
    "lighten", "plan", "ExcludeGuard", "LwCompileWarning", "CompileFailed",
    "NothingToLighten", "HELD_OUT", "TRAIN", "add_noise", "batches", "downscale",
    "load_folder", "load_images", "FitErrors", "distill", "init_layerwise",
    "FitTask", "register_fit", "ImageFolder", "PairedFolders", "compose", "gaussian_blur",
    "jpeg", "Scores", "validate",
    "PersistError", "SaveFileError", "WrongArchitectureError", "info", "load", "save",
    "convert", "NotSavableError", "OriginalNeededError", "ReplayError", "UnknownRuleError",
    "UntrustedFileError", "WeightMismatchError",
    "write_html", "emit_fast", "export_onnx", "export_program", "export_mobile", "profile",
    "channel_concat_parts",
    "CalibrationDataError", "Int8Error", "Int8QualityError", "Int8Report",
    "ArgumentError", "CheckpointError", "DestinationError", "TrainingError",
]


