"""Layer-wise initialisation: each replacement fitted to the teacher layer it replaced.

``lighten`` returns replacements with random weights. ``init_layerwise`` records what every
replaced layer of the teacher receives and returns on calibration data, and fits each
replacement to that by the fitting registered for its type (``fitting.py``), so that the
student starts close to the teacher before ``distill`` trains it whole:

    light = lwcompile.lighten(teacher, (torch.rand(1, 1, 40, 40),))
    init_layerwise(light, teacher, degrade=add_noise(25))
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch
from torch import Tensor, fx, nn

from .. import arguments as check
from ..errors import LwCompileError
from ..measure.snapshot import eval_mode
from ..report import APPLIED
from .blocks import Block, block_after, permute_inputs
from .checks import run_on_batch, teacher_has_sites, training_arguments
from .data import Degrade, model_inputs
from .device import amp_dtype, autocast, resolve_device
from .features import CHANNEL_ORDERS
from .fitting import FitTask, adam_steps, fitting_for, relative_error, solve_conv
from .normalization import update_bn_statistics
from .output_fit import Plug, fit_to_output

#: the output fit's learning rate, as a fraction of the layer fits' ``lr``: it refines a
#: replacement already fitted to its layer, through many layers (the full ``lr`` diverges)
OUTPUT_LR_FACTOR = 0.3


class FitErrors(dict[str, float]):
    """Relative error ||student(x) - teacher(x)||^2 / ||teacher(x)||^2 per site after fitting;
    ``before`` holds the same at the student's initial weights."""

    def __init__(self) -> None:
        super().__init__()
        self.before: dict[str, float] = {}


def applied_sites(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
    """The rewritten sites, each with the name of its replacement in the student: from the
    report (a pair rewrite such as conv + pixel shuffle puts it under a new name), or (a
    deepcopy of a GraphModule drops the report) the names where the student holds a module
    of another type than the teacher."""
    report = getattr(student, "lwcompile_report", None)
    if report is not None:
        return {row.site: row.result_name or row.site for row in report.rows
                if row.outcome == APPLIED}
    originals = dict(teacher.named_modules())
    sites: list[str] = []
    for name, m in student.named_modules():  # fx turns containers into plain Modules
        if name in originals and type(m) not in (nn.Module, type(originals[name])) \
                and not isinstance(m, fx.GraphModule) \
                and not any(name.startswith(s + ".") for s in sites):
            sites.append(name)
    if not sites:
        raise LwCompileError("no rewritten site found: pass lwcompile.lighten's result")
    return {site: site for site in sites}


@torch.no_grad()
def _record(teacher: nn.Module, sites: list[str], inputs: list[Tensor]
            ) -> dict[str, tuple[Tensor, Tensor]]:
    """Inputs and outputs of each site in the teacher, concatenated over the batches, in
    the order the teacher first calls the sites."""
    seen: dict[str, tuple[list[Tensor], list[Tensor]]] = {}  # in the order of first call

    def hook(site: str):
        def fn(_module: nn.Module, args: tuple, output: Tensor) -> None:
            xs, ys = seen.setdefault(site, ([], []))
            xs.append(args[0].detach().float().clone())
            ys.append(output.detach().float().clone())
        return fn

    handles = [teacher.get_submodule(s).register_forward_hook(hook(s)) for s in sites]
    try:
        with eval_mode(teacher):
            for x in inputs:
                teacher(x)
    finally:
        for h in handles:
            h.remove()
    return {s: (torch.cat(xs), torch.cat(ys)) for s, (xs, ys) in seen.items() if xs}


def _kept_convs(student: nn.Module, teacher: nn.Module, sites: dict[str, str]) -> list[str]:
    """Dense convs the student holds unchanged from the teacher (same name, same weight
    shape, not a site, zero padding), which least squares can refit."""
    theirs = dict(teacher.named_modules())
    kept = []
    for name, module in student.named_modules():
        original = theirs.get(name)
        if name in sites or type(module) is not nn.Conv2d or type(original) is not nn.Conv2d:
            continue
        if module.weight.shape == original.weight.shape and module.groups == 1 \
                and module.padding_mode == "zeros" and isinstance(module.padding, tuple):
            kept.append(name)
    return kept


class _Reached(Exception):
    """Raised by a hook to end a forward pass once the site's input is recorded."""


@torch.no_grad()
def _student_inputs(student: nn.Module, name: str, inputs: list[Tensor],
                    amp: torch.dtype | None) -> Tensor:
    """What the replacement ``name`` receives in ``student`` (eval mode) on ``inputs``: the
    outputs of the earlier sites as fitted so far, not the teacher's activations."""
    seen: list[Tensor] = []

    def hook(_module: nn.Module, args: tuple) -> None:
        seen.append(args[0].detach().float().clone())
        raise _Reached

    handle = student.get_submodule(name).register_forward_pre_hook(hook)
    try:
        with eval_mode(student):
            for x in inputs:
                try:
                    with autocast(x.device, amp):
                        student(x)
                except _Reached:
                    pass
    finally:
        handle.remove()
    return torch.cat(seen)


@torch.no_grad()
def _block_target(chain: tuple[nn.Module, ...], y: Tensor) -> Tensor:
    """What the teacher's block gives: ``chain`` as it is now (the teacher's per-channel
    modules, copied by ``lighten``), in eval mode, applied to the teacher site's output."""
    reference = copy.deepcopy(nn.Sequential(*chain)).eval()
    return reference(y)


def _fit_block(replacement: nn.Module, chain: tuple[nn.Module, ...], x: Tensor,
               target: Tensor, steps: int, lr: float, amp: torch.dtype | None) -> None:
    """Adam on the replacement's weights so that the block (replacement, then ``chain``,
    BatchNorms with their running statistics) maps ``x`` to the teacher block's ``target``."""
    block = nn.Sequential(replacement, *chain)
    modes = [m.training for m in block]
    for m in chain:
        m.eval()
    replacement.train()
    try:
        adam_steps(block, replacement.parameters(), x, target, steps, lr, amp)
    finally:
        for m, mode in zip(block, modes, strict=True):
            m.train(mode)


@torch.no_grad()
def _output_fit_data(teacher: nn.Module, batch: Tensor, crops: int
                     ) -> tuple[Tensor, Tensor] | None:
    """``crops`` crops of ``batch`` and the teacher's output on them, or None when the
    teacher returns something other than one tensor."""
    x = batch[:crops]
    with eval_mode(teacher):
        y = teacher(x)
    return (x, y.detach().float()) if isinstance(y, Tensor) else None


@torch.no_grad()
def _stands_in(replacement: nn.Module, x: Tensor, y: Tensor) -> bool:
    """Does the replacement take the teacher layer's input to an output shaped like the
    layer's (not so for a rewrite that also stands in for a following pixel shuffle)?"""
    with eval_mode(replacement):
        return replacement(x[:1]).shape[1:] == y.shape[1:]


def init_layerwise(
    student: nn.Module,
    teacher: nn.Module,
    data: Any = None,
    *,
    steps: int = 100,
    lr: float = 1e-2,
    calib_batches: int = 2,
    batch_size: int = 16,
    crop: int | None = 32,
    channels: int | None = None,
    degrade: Degrade | None = None,
    centre_heavy: bool = True,
    sequential: bool = True,
    block_steps: int = 0,
    bn_batches: int = 0,
    refit_kept: bool = False,
    output_steps: int = 0,
    output_crops: int = 8,
    device: Any = None,
    amp: str | None = None,
    seed: int = 0,
) -> FitErrors:
    """Fit every rewritten site of ``student`` to the teacher module it replaced, in place.

    The teacher's input and output at each site are recorded on ``calib_batches`` batches of
    ``data`` (see ``lwcompile.batches``), fed through ``degrade`` first (e.g.
    ``add_noise(25)`` for a denoiser); each replacement is then fitted to them by the fitting
    registered for its type (``lwcompile.register_fit``), with ``steps`` Adam steps at
    ``lr`` as its gradient budget. Built in: a LIST has its two output 1x1 convs solved by
    least squares around the Adam steps (they are linear in their weights, so the solve is
    the exact optimum); a Sequential ending in a dense conv (e.g. ``image_output_squeeze``'s)
    has that conv solved after Adam; a resize + LIST replacement has its LIST fitted on the
    resized input, for a sub-pixel rewrite against the teacher conv's output pixel-shuffled;
    an exact rewrite (``PointwiseOverParts``) is left as built; any other module gets Adam
    on the whole, where its output has the teacher's shape, and is otherwise skipped (it
    keeps its initial weights until ``distill``). ``channels`` defaults to the teacher's
    first conv's input channels.

    With ``sequential`` (the default), the sites are fitted in the order the teacher calls
    them, each on what it receives *in the student* (the earlier sites already fitted) rather
    than in the teacher, so that each fit corrects the error upstream instead of compounding
    it; then, with ``block_steps`` > 0, each replacement is refined by that many Adam steps
    through the per-channel modules that follow it (its BatchNorm and activation, with their
    running statistics) against the teacher's output there: block-wise reconstruction as in
    post-training quantisation. With ``refit_kept``, a dense conv the student
    kept from the teacher (such as DnCNN's output conv) that reads the output of a fitted
    site is solved by least squares on its input in the student, against its output in the
    teacher: a residual net's output conv turns a small error in its features into a large
    one in the image. With ``bn_batches`` > 0, the student's BatchNorm statistics
    are re-estimated at the end as a cumulative average over that many batches; off by
    default, since every fit above targets the teacher's activations as the teacher's own
    statistics normalise them.
    With ``output_steps`` > 0 (sequential only), each replacement, once
    fitted to its layer, takes that many Adam steps at ``lr`` x ``OUTPUT_LR_FACTOR``
    against the teacher's *output* on ``output_crops`` fresh crops, run through the teacher
    with this and the earlier replacements plugged in (``output_fit.py``): its error is then
    weighed by what the teacher's downstream layers make of it, and the last sites are
    fitted to what the student will output. Where the teacher returns more than one tensor
    this is skipped. Off by default: it pays where layer errors compound through a deep
    conv net (DnCNN, with ``refit_kept``) and costs a teacher pass per step, which a
    transformer whose low-rank factors are already fitted in closed form does not repay
    (both measured in docs/quality.md).
    ``sequential=False`` fits every site on the teacher's activations (independent fits).

    With ``centre_heavy``, a replacement whose fitting asks for another order of its output
    channels (LIST's first half comes from its 1x1 branch, so it takes the teacher channels
    with the most centre-heavy kernels, ``centre_heavy_order``) is fitted to the teacher
    output in that order, and the order is undone exactly downstream by permuting the
    per-channel modules (BN, activations) and the input channels of the single conv/LIST
    that consumes the output. Where the output goes anywhere else (a skip, a concat, several
    users) no exact undo is that simple, and the site is fitted in the teacher's order.

    ``device`` (default: where the student's parameters are) is where the fits run; the
    teacher is moved there. ``amp`` ("bf16", "fp16" on a GPU, or None) autocasts the forward
    passes of the gradient steps; least-squares solves stay in float64.
    """
    training_arguments("init_layerwise", student, teacher, steps=steps, lr=lr,
                       batch_size=batch_size, crop=crop, channels=channels, degrade=degrade,
                       seed=seed)
    check.integer("init_layerwise", "calib_batches", calib_batches, minimum=1)
    check.integer("init_layerwise", "block_steps", block_steps, minimum=0)
    check.integer("init_layerwise", "bn_batches", bn_batches, minimum=0)
    check.flag("init_layerwise", "sequential", sequential)
    check.flag("init_layerwise", "refit_kept", refit_kept)
    check.integer("init_layerwise", "output_steps", output_steps, minimum=0)
    check.integer("init_layerwise", "output_crops", output_crops, minimum=1)
    where = resolve_device("init_layerwise", device, student)
    dtype = amp_dtype("init_layerwise", amp, where)
    sites = applied_sites(student, teacher)
    teacher_has_sites("init_layerwise", teacher, sites)
    student.to(where)
    teacher.to(where)
    stream = model_inputs(data, teacher, channels, degrade, batch_size, crop, seed)
    inputs = [x.to(where) for _, (_, x) in zip(range(calib_batches), stream, strict=False)]
    for x in inputs[:1]:
        with torch.no_grad():
            run_on_batch("init_layerwise", "teacher", teacher, x)
    kept = _kept_convs(student, teacher, sites) if sequential and refit_kept else []
    recorded = _record(teacher, [*sites, *kept], inputs)  # in the order the teacher calls them
    errors = FitErrors()
    pending: list[tuple[tuple[nn.Module, ...], nn.Module, Tensor]] = []
    fitted_any = False
    output_fit = sequential and output_steps > 0
    plugs: dict[str, Plug] = {}
    #: consumers whose input channels were permuted (by id), with the order
    input_orders: dict[int, Tensor] = {}
    #: replacements whose block's output channels were permuted (by name), with the order
    block_orders: dict[str, list[int]] = {}
    for site in recorded:
        if site in kept:
            if fitted_any:  # its input in the student differs from the teacher's: refit
                conv = student.get_submodule(site)
                solve_conv(conv, _student_inputs(student, site, inputs, dtype),
                           recorded[site][1])
            continue
        name = sites[site]
        replacement = student.get_submodule(name)
        x, y = recorded[site]
        if sequential:
            x = _student_inputs(student, name, inputs, dtype)
        chosen = fitting_for(replacement).part(replacement, x, y)
        if chosen is None:
            continue
        module, x, target = chosen
        fitting = fitting_for(module)
        errors.before[site] = relative_error(module, x, target)
        original = teacher.get_submodule(site)
        whole = module is replacement
        block = block_after(student, site) if whole else Block((), None)
        block_target = _block_target(block.chain, target) \
            if sequential and block_steps and block.chain else None
        order = fitting.channel_order(module, original) if centre_heavy and whole else None
        if order is not None and block.consumer is not None:
            block_orders[name] = order.tolist()
            target = target[:, order]
            block_target = None if block_target is None else block_target[:, order]
            if sequential:  # undone now: the next sites are fitted on this order
                permute_inputs(block.chain, block.consumer, order)
                input_orders[id(block.consumer)] = order
            else:  # undone after all fits: the consumer is fitted on the teacher's order
                pending.append((block.chain, block.consumer, order))
        was_training = module.training
        module.train()
        try:
            fitting.fit(module, FitTask(x, target, original, steps, lr, dtype))
        finally:
            module.train(was_training)
        if block_target is not None:
            _fit_block(module, block.chain, x, block_target, block_steps, lr, dtype)
        if output_fit and _stands_in(replacement, *recorded[site]):
            permuted = order is not None and block.consumer is not None
            plugs[site] = Plug(replacement, input_orders.get(id(replacement)),
                               order if permuted else None)
            fresh = _output_fit_data(teacher, next(stream)[1].to(where), output_crops)
            if fresh is not None:
                fit_to_output(teacher, plugs, site, *fresh, output_steps,
                              lr * OUTPUT_LR_FACTOR, dtype)
        errors[site] = relative_error(module, x, target)
        fitted_any = True
    for chain, consumer, perm in pending:  # after all fits: consumers were fitted in order
        permute_inputs(chain, consumer, perm)
    setattr(student, CHANNEL_ORDERS, block_orders)  # for feature distillation (features.py)
    if bn_batches:
        update_bn_statistics(student, (x for _, x in itertools.islice(
            model_inputs(data, teacher, channels, degrade, batch_size, crop, seed + 7919),
            bn_batches)), where, dtype)
    return errors
