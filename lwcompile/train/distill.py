"""Give a lightened model its teacher's knowledge: layer-wise initialisation, then distillation.

``lighten`` returns replacements with random weights. ``init_layerwise`` fits each one to the
module it replaced, on the teacher's own activations, so the student starts close to the
teacher; ``distill`` then trains the whole student to reproduce the teacher's outputs.

    light = lwcompile.lighten(teacher, (torch.rand(1, 1, 40, 40),))
    init_layerwise(light, teacher, degrade=add_noise(25))
    distill(light, teacher, steps=2000, degrade=add_noise(25), checkpoint="run.pt")
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ..errors import LwCompileError
from ..nn import LIST, Resize
from ..report import APPLIED
from .data import Degrade, batches, step_generator

#: modules that act on each channel separately: a channel permutation passes through them
_PER_CHANNEL = (nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.GELU,
                nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Identity, nn.Dropout)


class FitErrors(dict[str, float]):
    """Relative error ||student(x) - teacher(x)||^2 / ||teacher(x)||^2 per site after fitting;
    ``before`` holds the same at the student's initial weights."""

    def __init__(self) -> None:
        super().__init__()
        self.before: dict[str, float] = {}


def _channels_of(teacher: nn.Module) -> int:
    conv = next((m for m in teacher.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None:
        raise LwCompileError("cannot infer the image channels: pass channels=")
    return conv.in_channels


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


def _inputs(data: Any, teacher: nn.Module, channels: int | None, degrade: Degrade | None,
            batch_size: int, crop: int | None, seed: int, start: int = 0,
            rank: int = 0) -> Iterable[tuple[int, Tensor]]:
    """(step, model input) pairs; the degradation noise is also seeded by the step."""
    stream = batches(data, channels=channels or _channels_of(teacher), batch_size=batch_size,
                     crop=crop, seed=seed, start=start, rank=rank)
    for step, clean in enumerate(stream, start):
        yield step, clean if degrade is None else degrade(
            clean, step_generator(seed + 1, rank, step))


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


def centre_heavy_order(conv: nn.Conv2d) -> Tensor:
    """Output channels sorted by the share of their kernel's energy in the centre tap.

    The first half are the most nearly 1x1 filters: the ones LIST's pointwise branch can
    reproduce."""
    w = conv.weight.detach().pow(2)
    k_h, k_w = w.shape[-2:]
    share = w[..., k_h // 2, k_w // 2].sum(1) / w.sum((1, 2, 3)).clamp_min(1e-12)
    order = torch.argsort(share, descending=True, stable=True)
    half = len(order) // 2
    return torch.cat([order[:half].sort().values, order[half:].sort().values])


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
            if isinstance(module, _PER_CHANNEL):
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


@torch.no_grad()
def _solve_conv(conv: nn.Conv2d, features: Tensor, target: Tensor, ridge: float = 1e-4) -> None:
    """Set ``conv``'s weight and bias to the ridge least-squares fit of ``target`` from
    ``features``: its output is linear in them. The normal equations are accumulated over the
    unfolded input patches one sample at a time (a 9x9 conv has C*81 inputs per pixel)."""
    gram = rhs = 0
    for f, t in zip(features, target, strict=True):
        patches = F.unfold(f[None], conv.kernel_size, dilation=conv.dilation,
                           padding=conv.padding, stride=conv.stride)[0].double()
        patches = torch.cat([patches, torch.ones(1, patches.shape[1], dtype=patches.dtype)])
        gram = gram + patches @ patches.T
        rhs = rhs + patches @ t.flatten(1).double().T
    gram += ridge * gram.diagonal().mean() * torch.eye(len(gram), dtype=gram.dtype)
    sol = torch.linalg.solve(gram, rhs).float()
    conv.weight.copy_(sol[:-1].T.reshape(conv.weight.shape))
    if conv.bias is not None:
        conv.bias.copy_(sol[-1])


@torch.no_grad()
def _least_squares_heads(rep: LIST, x: Tensor, y: Tensor) -> None:
    """Solve LIST's two output 1x1 convs exactly for the target, given squeeze and depthwise."""
    squeezed = rep.squeeze(x)
    half = rep.pointwise_branch.out_channels
    _solve_conv(rep.pointwise_branch, squeezed, y[:, :half])
    _solve_conv(rep.spatial_branch[1], rep.spatial_branch[0](squeezed), y[:, half:])


def _solvable_last_conv(rep: nn.Module) -> nn.Conv2d | None:
    """The dense conv ending a Sequential replacement, if least squares can solve it."""
    last = rep[-1] if isinstance(rep, nn.Sequential) and len(rep) > 1 else None
    if type(last) is nn.Conv2d and last.groups == 1 and last.padding_mode == "zeros" \
            and isinstance(last.padding, tuple):
        return last
    return None


@torch.no_grad()
def _least_squares_last_conv(rep: nn.Sequential, x: Tensor, y: Tensor,
                             ridge: float = 1e-4) -> None:
    """Solve the final conv of ``rep`` exactly for the target, given the layers before it."""
    _solve_conv(rep[-1], rep[:-1](x), y, ridge)


#: what may follow a resampling replacement's LIST: pointwise, or the unshuffle that hands
#: a pixel shuffle out of reach its low-resolution layout
_AFTER_LIST = (*_PER_CHANNEL, nn.PixelUnshuffle)


@torch.no_grad()
def _what_to_fit(rep: nn.Module, x: Tensor, y: Tensor) -> tuple[nn.Module, Tensor, Tensor] | None:
    """The module to fit for a replacement, its input and its target (None: nothing fits).

    A replacement that gives the site's output is fitted whole; a resize + LIST one
    (strided, transposed and sub-pixel rules) has its LIST fitted on the resized input, so
    LIST's least-squares solve applies. A sub-pixel rewrite stands in for conv -> [activation]
    -> pixel shuffle(r) and the teacher's site is the conv, so that LIST's target is the
    conv's output pixel-shuffled: the activation is per-channel, so it commutes with the
    shuffle, and it follows the LIST in the replacement too.
    """
    if isinstance(rep, nn.Sequential) and len(rep) > 1 and isinstance(rep[0], Resize) \
            and isinstance(rep[1], LIST) and all(isinstance(m, _AFTER_LIST) for m in rep[2:]):
        resized = rep[0](x)
        phases, rest = divmod(y.shape[1], 2 * rep[1].pointwise_branch.out_channels)
        r = math.isqrt(phases)
        if rest or r == 0 or r * r != phases:
            return None
        target = y if r == 1 else F.pixel_shuffle(y, r)
        return (rep[1], resized, target) if target.shape[-2:] == resized.shape[-2:] else None
    return (rep, x, y) if rep(x[:1]).shape == y[:1].shape else None


def _adam_fit(rep: nn.Module, x: Tensor, y: Tensor, steps: int, lr: float) -> None:
    opt = torch.optim.Adam(rep.parameters(), lr=lr)
    for i in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * 0.5 * (1 + math.cos(math.pi * i / steps))
        loss = F.mse_loss(rep(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


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

    Each replacement learns to map the teacher's recorded input at that site to the teacher's
    recorded output (on ``calib_batches`` batches of ``data``, see ``lwcompile.data.batches``,
    fed through ``degrade`` first, e.g. ``add_noise(25)`` for a denoiser): ``steps`` of Adam,
    and for LIST a least-squares solve of its two output 1x1 convs before and after; a
    Sequential ending in a dense conv (e.g. ``image_output_squeeze``'s) gets that last conv
    solved by least squares after Adam (on the SR teacher's 9x9 output conv: 28.1 -> 30.5 dB).
    Resize + LIST replacements have their LIST fitted on the resized input; for a sub-pixel
    rewrite, against the teacher conv's output pixel-shuffled (``_what_to_fit``). Sites
    whose replacement fits none of these are skipped: they keep their initial weights until
    ``distill``. ``channels`` defaults to the teacher's first conv's input channels.

    LIST's first half of output channels comes from its 1x1 branch, so with ``centre_heavy``
    the teacher channels with the most centre-heavy kernels are given to that branch: the
    LIST is fitted to the teacher output with channels reordered by ``centre_heavy_order``,
    and the order is undone exactly downstream by permuting the per-channel modules (BN,
    activations) and the input channels of the single conv/LIST that consumes the output.
    Where the output goes anywhere else (a skip, a concat, several users) no exact undo is
    that simple, and the site is fitted in the original order.
    """
    sites = _applied_sites(student, teacher)
    stream = _inputs(data, teacher, channels, degrade, batch_size, crop, seed)
    inputs = [x for _, (_, x) in zip(range(calib_batches), stream, strict=False)]
    recorded = _record(teacher, list(sites), inputs)
    errors = FitErrors()
    pending: list[tuple[list[nn.Module], nn.Module, Tensor]] = []
    for site, name in sites.items():
        if site not in recorded:
            continue  # never called on this input
        replacement = student.get_submodule(name)
        fit = _what_to_fit(replacement, *recorded[site])
        if fit is None:
            continue
        rep, x, target = fit
        errors.before[site] = _rel_error(rep, x, target)
        original = teacher.get_submodule(site)
        if centre_heavy and rep is replacement and isinstance(rep, LIST) \
                and isinstance(original, nn.Conv2d):
            found = _permutable_consumer(student, site)
            if found is not None:
                perm = centre_heavy_order(original)
                target = target[:, perm]
                pending.append((*found, perm))
        was_training = rep.training
        rep.train()
        if isinstance(rep, LIST):
            _least_squares_heads(rep, x, target)
        _adam_fit(rep, x, target, steps, lr)
        if isinstance(rep, LIST):
            _least_squares_heads(rep, x, target)
        elif _solvable_last_conv(rep) is not None:
            _least_squares_last_conv(rep, x, target)
        rep.train(was_training)
        errors[site] = _rel_error(rep, x, target)
    for chain, consumer, perm in pending:  # after all fits: consumers were fitted in order
        _permute_inputs(chain, consumer, perm)
    return errors


def _save_atomic(state: dict[str, Any], path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def distill(
    student: nn.Module,
    teacher: nn.Module,
    data: Any = None,
    steps: int = 1000,
    *,
    lr: float = 1e-3,
    loss: str = "l1",
    batch_size: int = 16,
    crop: int | None = 40,
    channels: int | None = None,
    degrade: Degrade | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    progress: bool = True,
    seed: int = 0,
    lr_schedule: Callable[[int], float] | None = None,
    stop_when: Callable[[], bool] | None = None,
) -> nn.Module:
    """Train ``student`` in place to reproduce ``teacher``'s outputs; returns it.

    ``stop_when``, asked before each step, ends training early when it answers True (e.g. a
    time budget is spent); the checkpoint is written as at the end.

    Adam at ``lr``, times ``lr_schedule(step)`` if given (a function of the step alone, so
    that resuming stays exact; by default constant, so a longer run continues a shorter
    one). Step ``s`` always sees the same batch and noise (generators seeded from
    ``(seed, rank, s)``), and the checkpoint holds weights, optimiser, step and RNG state:
    a run resumed from its checkpoint ends bit-identical to an uninterrupted one. Checkpoints
    are written atomically (temp file, then ``os.replace``) every ``checkpoint_every`` steps
    and at the end. ``data``, ``batch_size``, ``crop``, ``channels`` and ``degrade`` are as
    in ``init_layerwise``.

    Launched by ``torchrun`` (``WORLD_SIZE`` set), it trains with DistributedDataParallel
    (gloo on CPU): each rank draws its own crops, gradients are averaged, rank 0 writes the
    checkpoints.
    """
    losses = {"l1": F.l1_loss, "mse": F.mse_loss}
    if loss not in losses:
        raise LwCompileError(f"loss must be one of {sorted(losses)}, got {loss!r}")
    criterion = losses[loss]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0

    torch.manual_seed(seed)
    random.seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    start = 0
    path = Path(checkpoint) if checkpoint is not None else None
    if path is not None and resume and path.exists():
        state = torch.load(path, weights_only=True)
        student.load_state_dict(state["student"])
        opt.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        random.setstate((state["python_rng"][0], tuple(state["python_rng"][1]),
                         state["python_rng"][2]))
        start = int(state["step"])

    def save(step: int) -> None:
        if path is not None and rank == 0:
            rng = random.getstate()
            _save_atomic({"student": student.state_dict(), "optimizer": opt.state_dict(),
                          "step": step, "torch_rng": torch.get_rng_state(),
                          "python_rng": (rng[0], list(rng[1]), rng[2]), "seed": seed}, path)

    model: nn.Module = student
    if world > 1:
        model = nn.parallel.DistributedDataParallel(student)
    teacher_was_training, student_was_training = teacher.training, student.training
    teacher.eval()
    model.train()
    bar = _progress(start, steps, progress and rank == 0)
    done = start
    try:
        stream = _inputs(data, teacher, channels, degrade, batch_size, crop, seed, start, rank)
        for _ in range(start, steps):
            if stop_when is not None and stop_when():
                break
            item = next(stream, None)
            if item is None:
                break
            step, x = item
            if lr_schedule is not None:
                for group in opt.param_groups:
                    group["lr"] = lr * lr_schedule(step)
            with torch.no_grad():
                target = teacher(x)
            value = criterion(model(x), target)
            opt.zero_grad(set_to_none=True)
            value.backward()
            opt.step()
            done = step + 1
            bar(done, value.item())
            if done % checkpoint_every == 0:
                save(done)
        if done > start and done % checkpoint_every:
            save(done)
    finally:
        bar(None, None)
        teacher.train(teacher_was_training)
        student.train(student_was_training)
        if own_group:
            del model  # DDP's reducer must go before its process group, or exit can hang
            dist.destroy_process_group()
    return student


def _progress(start: int, total: int, enabled: bool):
    """A callback (step, loss) -> None drawing a tqdm bar, or printing if tqdm is missing;
    called with (None, None) to close."""
    if not enabled:
        return lambda step, value: None
    try:
        from tqdm import tqdm
    except ImportError:
        every = max(1, total // 20)

        def show(step: int | None, value: float | None) -> None:
            if step is not None and (step % every == 0 or step == total):
                print(f"distill step {step}/{total} loss {value:.4g}", flush=True)
        return show
    bar = tqdm(total=total, initial=start, desc="distill", unit="step")

    def update(step: int | None, value: float | None) -> None:
        if step is None:
            bar.close()
        else:
            bar.update(1)
            bar.set_postfix(loss=f"{value:.4g}", refresh=False)
    return update
