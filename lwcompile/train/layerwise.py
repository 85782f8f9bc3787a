"""Layer-wise initialisation: each replacement fitted to the teacher layer it replaced.

``lighten`` returns replacements with random weights. ``init_layerwise`` records what every
replaced layer of the teacher receives and returns on calibration data, and fits each
replacement to that by the fitting registered for its type (``fitting.py``), so that the
student starts close to the teacher before ``distill`` trains it whole:

    light = lwcompile.lighten(teacher, (torch.rand(1, 1, 40, 40),))
    init_layerwise(light, teacher, degrade=add_noise(25))
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn

from .. import arguments as check
from ..errors import LwCompileError
from ..nn import LIST
from ..report import APPLIED
from .checks import run_on_batch, teacher_has_sites, training_arguments
from .data import Degrade, model_inputs
from .fitting import PER_CHANNEL, FitTask, fitting_for


class FitErrors(dict[str, float]):
    """Relative error ||student(x) - teacher(x)||^2 / ||teacher(x)||^2 per site after fitting;
    ``before`` holds the same at the student's initial weights."""

    def __init__(self) -> None:
        super().__init__()
        self.before: dict[str, float] = {}


def _applied_sites(student: nn.Module, teacher: nn.Module) -> dict[str, str]:
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
    """Inputs and outputs of each site in the teacher, concatenated over the batches."""
    seen: dict[str, tuple[list[Tensor], list[Tensor]]] = {s: ([], []) for s in sites}

    def hook(site: str):
        def fn(_module: nn.Module, args: tuple, output: Tensor) -> None:
            seen[site][0].append(args[0].detach().clone())
            seen[site][1].append(output.detach().clone())
        return fn

    handles = [teacher.get_submodule(s).register_forward_hook(hook(s)) for s in sites]
    was_training = teacher.training
    teacher.eval()
    try:
        for x in inputs:
            teacher(x)
    finally:
        teacher.train(was_training)
        for h in handles:
            h.remove()
    return {s: (torch.cat(xs), torch.cat(ys)) for s, (xs, ys) in seen.items() if xs}


@torch.no_grad()
def _rel_error(module: nn.Module, x: Tensor, y: Tensor) -> float:
    return float((module(x) - y).pow(2).sum() / y.pow(2).sum().clamp_min(1e-12))


def _permutable_consumer(student: nn.Module, site: str) -> tuple[list[nn.Module], nn.Module] | None:
    """If the site's output only flows through per-channel modules into one conv, return them.

    That is the case where permuting the site's output channels can be undone exactly by
    permuting those modules' channels and the consumer's input channels."""
    for prefix, gm in student.named_modules():
        if not isinstance(gm, fx.GraphModule):
            continue
        name = site[len(prefix) + 1:] if prefix else site
        if prefix and not site.startswith(prefix + "."):
            continue
        calls: dict[str, int] = {}
        for n in gm.graph.nodes:
            if n.op == "call_module":
                calls[n.target] = calls.get(n.target, 0) + 1
        node = next((n for n in gm.graph.nodes if n.op == "call_module" and n.target == name),
                    None)
        if node is None or calls[name] != 1:
            continue
        chain: list[nn.Module] = []
        while len(node.users) == 1:
            node = next(iter(node.users))
            if node.op != "call_module" or calls[node.target] != 1 \
                    or len(node.all_input_nodes) != 1:
                return None
            module = gm.get_submodule(node.target)
            if isinstance(module, PER_CHANNEL):
                chain.append(module)
            elif isinstance(module, LIST) or isinstance(module, nn.Conv2d) and module.groups == 1:
                return chain, module
            else:
                return None
        return None
    return None


@torch.no_grad()
def _permute_inputs(chain: list[nn.Module], consumer: nn.Module, perm: Tensor) -> None:
    """Make ``chain`` and ``consumer`` read channel k as the channel ``perm[k]`` they expect."""
    for m in chain:
        if isinstance(m, nn.BatchNorm2d):
            for t in (m.weight, m.bias, m.running_mean, m.running_var):
                if t is not None:
                    t.copy_(t[perm])
        elif isinstance(m, nn.PReLU) and m.weight.numel() > 1:
            m.weight.copy_(m.weight[perm])
    conv = consumer.squeeze if isinstance(consumer, LIST) else consumer
    conv.weight.copy_(conv.weight[:, perm])


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

    With ``centre_heavy``, a replacement whose fitting asks for another order of its output
    channels (LIST's first half comes from its 1x1 branch, so it takes the teacher channels
    with the most centre-heavy kernels, ``centre_heavy_order``) is fitted to the teacher
    output in that order, and the order is undone exactly downstream by permuting the
    per-channel modules (BN, activations) and the input channels of the single conv/LIST
    that consumes the output. Where the output goes anywhere else (a skip, a concat, several
    users) no exact undo is that simple, and the site is fitted in the teacher's order.
    """
    training_arguments("init_layerwise", student, teacher, steps=steps, lr=lr,
                       batch_size=batch_size, crop=crop, channels=channels, degrade=degrade,
                       seed=seed)
    check.integer("init_layerwise", "calib_batches", calib_batches, minimum=1)
    sites = _applied_sites(student, teacher)
    teacher_has_sites("init_layerwise", teacher, sites)
    stream = model_inputs(data, teacher, channels, degrade, batch_size, crop, seed)
    inputs = [x for _, (_, x) in zip(range(calib_batches), stream, strict=False)]
    for x in inputs[:1]:
        with torch.no_grad():
            run_on_batch("init_layerwise", "teacher", teacher, x)
    recorded = _record(teacher, list(sites), inputs)
    errors = FitErrors()
    pending: list[tuple[list[nn.Module], nn.Module, Tensor]] = []
    for site, name in sites.items():
        if site not in recorded:
            continue  # never called on this input
        replacement = student.get_submodule(name)
        chosen = fitting_for(replacement).part(replacement, *recorded[site])
        if chosen is None:
            continue
        module, x, target = chosen
        fitting = fitting_for(module)
        errors.before[site] = _rel_error(module, x, target)
        original = teacher.get_submodule(site)
        order = fitting.channel_order(module, original) \
            if centre_heavy and module is replacement else None
        if order is not None:
            found = _permutable_consumer(student, site)
            if found is not None:
                target = target[:, order]
                pending.append((*found, order))
        was_training = module.training
        module.train()
        try:
            fitting.fit(module, FitTask(x, target, original, steps, lr))
        finally:
            module.train(was_training)
        errors[site] = _rel_error(module, x, target)
    for chain, consumer, perm in pending:  # after all fits: consumers were fitted in order
        _permute_inputs(chain, consumer, perm)
    return errors
