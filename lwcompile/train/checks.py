"""What ``init_layerwise`` and ``distill`` check before and while they train, so that a wrong
argument, images the teacher cannot read or a mismatched teacher is an ``LwCompileError``
naming the problem rather than a raw torch error from the middle of a training loop."""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from .. import arguments as check
from ..errors import TrainingError, one_line


def training_arguments(where: str, student: Any, teacher: Any, *, steps: Any, lr: Any,
                       batch_size: Any, crop: Any, channels: Any, degrade: Any,
                       seed: Any) -> None:
    """The arguments both training entry points share, checked by ``lwcompile.arguments``."""
    check.module(where, "student", student)
    check.module(where, "teacher", teacher)
    check.integer(where, "steps", steps, minimum=0)
    check.number(where, "lr", lr, positive=True)
    check.integer(where, "batch_size", batch_size, minimum=1)
    check.integer(where, "crop", crop, minimum=1, optional=True)
    check.integer(where, "channels", channels, minimum=1, optional=True)
    check.function(where, "degrade", degrade)
    check.integer(where, "seed", seed)


def _shape(x: Tensor) -> str:
    return "x".join(map(str, x.shape))


def run_on_batch(where: str, role: str, model: nn.Module, x: Tensor) -> Any:
    """``model(x)``, with a failure reported as a TrainingError naming the model and batch."""
    try:
        return model(x)
    except Exception as exc:
        raise TrainingError(
            f"{where}: the {role} ({type(model).__name__}) cannot run on a training batch of "
            f"shape {_shape(x)}: {one_line(exc)} (are the images' channels right? pass "
            "channels= or data of the model's image format)") from exc


def same_output_shape(where: str, output: Tensor, target: Tensor) -> None:
    """The student must produce what the teacher does, or the loss would broadcast."""
    if not isinstance(output, Tensor) or not isinstance(target, Tensor):
        raise TrainingError(f"{where}: the student and the teacher must each return one "
                            f"tensor, got {type(output).__name__} and {type(target).__name__}")
    if output.shape != target.shape:
        raise TrainingError(f"{where}: the student's output {_shape(output)} differs from the "
                            f"teacher's {_shape(target)}: is the teacher the model the student "
                            "was lightened from?")


def fits_target(where: str, output: Tensor, target: Tensor) -> None:
    """The student's output must have the shape of the data's clean target."""
    if output.shape != target.shape:
        raise TrainingError(f"{where}: the student's output {_shape(output)} differs from the "
                            f"data's target {_shape(target)}: ground_truth needs targets at "
                            "the output's size")


def teacher_has_sites(where: str, teacher: nn.Module, sites: Any) -> None:
    """Every site the student's report rewrote must exist in the teacher."""
    names = {name for name, _ in teacher.named_modules()}
    missing = [site for site in sites if site not in names]
    if missing:
        raise TrainingError(f"{where}: the teacher ({type(teacher).__name__}) has no module "
                            f"{missing[0]!r}, which the student's report rewrote: pass the "
                            "model the student was lightened from")
