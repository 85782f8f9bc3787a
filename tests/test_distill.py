"""Layer-wise initialisation, distillation (resume, torchrun) and the data sources they read."""

from __future__ import annotations

import copy
import itertools
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import lwcompile
from examples.dncnn import DnCNN
from lwcompile import LIST, LwCompileError
from lwcompile.train.blocks import block_after, permute_inputs
from lwcompile.train.data import add_noise, batches, load_images
from lwcompile.train.distill import distill
from lwcompile.train.fitting import centre_heavy_order, least_squares_last_conv
from lwcompile.train.layerwise import init_layerwise

ROOT = Path(__file__).resolve().parents[1]


def smooth_images(n: int, seed: int, size: int = 48) -> torch.Tensor:
    """Stand-in natural images: smooth random fields plus a few edges, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    x = F.interpolate(torch.rand(n, 1, 6, 6, generator=g), size=(size, size), mode="bicubic",
                      align_corners=False)
    edges = (torch.rand(n, 1, 1, size, generator=g) > 0.8).float().cumsum(-1) % 2
    return (0.7 * x + 0.3 * edges).clamp(0, 1)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pair():
    torch.manual_seed(0)
    teacher = DnCNN(features=16, depth=5).eval()
    return teacher, lwcompile.lighten(teacher, (torch.rand(1, 1, 32, 32),))


def output_error(student, teacher, x) -> float:
    with torch.no_grad():
        return float(F.mse_loss(student.eval()(x), teacher.eval()(x)))


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa), "states differ"


def test_layerwise_init_beats_random_init_on_held_out_data(pair):
    teacher, light = pair
    student = copy.deepcopy(light)
    held_out = add_noise(25)(smooth_images(8, seed=99), torch.Generator().manual_seed(1))
    random_init = output_error(student, teacher, held_out)
    errors = init_layerwise(student, teacher, smooth_images(16, seed=1), steps=60,
                            degrade=add_noise(25), batch_size=8)
    assert set(errors) == {r.site for r in light.lwcompile_report.applied}
    assert all(errors[s] < errors.before[s] for s in errors)
    assert output_error(student, teacher, held_out) < 0.1 * random_init


def test_least_squares_recovers_the_last_conv_of_a_sequential_replacement():
    torch.manual_seed(0)
    rep = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 3, 5, padding=2))
    truth = copy.deepcopy(rep[1])
    torch.nn.init.normal_(rep[1].weight)
    x = torch.randn(3, 8, 12, 12)
    with torch.no_grad():
        y = truth(rep[0](x))
    least_squares_last_conv(rep, x, y, ridge=1e-10)
    torch.testing.assert_close(rep[1].weight, truth.weight, rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(rep[1].bias, truth.bias, rtol=1e-3, atol=1e-4)


def test_centre_heavy_reordering_is_undone_exactly(pair):
    """A permutation of LIST's outputs compensated downstream leaves the network unchanged."""
    _, light = pair
    student = copy.deepcopy(light).eval()
    for bn in (m for m in student.modules() if isinstance(m, torch.nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        torch.nn.init.uniform_(bn.weight, 0.5, 2)
    x = torch.rand(2, 1, 24, 24)
    before = student(x)
    site = "body.2"
    rep: LIST = student.get_submodule(site)
    block = block_after(student, site)
    assert len(block.chain) == 2 and block.consumer is not None  # BN, ReLU -> next LIST
    # a permutation that keeps each half in its branch can be applied to the branch rows
    half = rep.pointwise_branch.out_channels
    perm = torch.cat([torch.randperm(half), half + torch.randperm(half)])
    with torch.no_grad():
        for conv, p in ((rep.pointwise_branch, perm[:half]),
                        (rep.spatial_branch[1], perm[half:] - half)):
            conv.weight.copy_(conv.weight[p])
            conv.bias.copy_(conv.bias[p])
    permute_inputs(block.chain, block.consumer, perm)
    torch.testing.assert_close(student(x), before, rtol=1e-5, atol=1e-5)


def test_centre_heavy_order_puts_nearly_1x1_kernels_first():
    conv = torch.nn.Conv2d(2, 4, 3, bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.weight[1, :, 1, 1] = 50.0
        conv.weight[3, :, 1, 1] = 20.0
    assert centre_heavy_order(conv).tolist() == [1, 3, 0, 2]


def test_resumed_distillation_is_bit_identical(pair, tmp_path):
    teacher, light = pair
    data = smooth_images(16, seed=2)
    kw = dict(data=data, degrade=add_noise(25), batch_size=4, crop=32, checkpoint_every=3,
              progress=False, lr=1e-3, seed=3, lr_schedule=lambda s: 0.5 ** (s // 4))
    straight = distill(copy.deepcopy(light), teacher, steps=10,
                       checkpoint=tmp_path / "a.pt", **kw)
    first = distill(copy.deepcopy(light), teacher, steps=6, checkpoint=tmp_path / "b.pt", **kw)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 6
    resumed = distill(copy.deepcopy(light), teacher, steps=10, checkpoint=tmp_path / "b.pt",
                      **kw)
    assert torch.load(tmp_path / "b.pt", weights_only=True)["step"] == 10
    assert_same_state(resumed, straight)
    with pytest.raises(AssertionError):
        assert_same_state(first, straight)
    assert not list(tmp_path.glob("*.tmp"))


def test_stop_when_ends_training_early_and_saves_where_it_stopped(pair, tmp_path):
    teacher, light = pair
    asked = []
    stop = lambda: asked.append(1) or len(asked) > 5  # noqa: E731 - stop before the 6th step
    distill(copy.deepcopy(light), teacher, smooth_images(8, seed=2), steps=100, batch_size=4,
            crop=32, progress=False, checkpoint=tmp_path / "c.pt", checkpoint_every=50,
            stop_when=stop)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["step"] == 5
    assert len(asked) == 6


def test_progress_falls_back_to_prints_without_tqdm(pair, monkeypatch, capsys):
    teacher, light = pair
    monkeypatch.setitem(sys.modules, "tqdm", None)
    distill(copy.deepcopy(light), teacher, smooth_images(4, seed=5), steps=2, batch_size=2,
            crop=32, loss="mse")
    assert "distill step 2/2" in capsys.readouterr().out
    with pytest.raises(LwCompileError, match="loss"):
        distill(copy.deepcopy(light), teacher, steps=1, loss="huber")


@pytest.mark.slow  # two processes under torchrun
def test_distill_under_torchrun_with_two_processes(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(textwrap.dedent(f"""
        import os, torch, lwcompile
        from examples.dncnn import DnCNN
        from lwcompile.train.distill import distill
        torch.manual_seed(0)
        teacher = DnCNN(features=16, depth=3).eval()
        student = lwcompile.lighten(teacher, (torch.rand(1, 1, 16, 16),))
        distill(student, teacher, torch.rand(8, 1, 16, 16), steps=3, batch_size=2, crop=16,
                checkpoint={str(tmp_path / "ckpt.pt")!r}, progress=False)
        torch.save(student.state_dict(), {str(tmp_path)!r} + f"/rank{{os.environ['RANK']}}.pt")
    """))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    # own session, so that a hung worker can be killed with its launcher
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                             "2", "--standalone", str(script)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    assert proc.returncode == 0, out.decode()[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0] if "running" not in k)
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 3


def test_batches_from_tensors_and_loaders():
    rgb = torch.rand(5, 3, 20, 24)
    b = next(batches(rgb, channels=1, batch_size=3, crop=16))
    assert b.shape == (3, 1, 16, 16) and b.dtype == torch.float32
    grey8 = (torch.rand(2, 1, 20, 20) * 255).to(torch.uint8)
    b = next(batches(grey8, channels=3, batch_size=2, crop=8))
    assert b.shape == (2, 3, 8, 8) and float(b.max()) <= 1.0
    # the batch of a step depends only on (seed, rank, step)
    again = list(zip(range(3), batches(rgb, crop=16, seed=4), strict=False))[2][1]
    assert torch.equal(again, next(batches(rgb, crop=16, seed=4, start=2)))
    assert not torch.equal(again, next(batches(rgb, crop=16, seed=4, start=2, rank=1)))
    loader = DataLoader(TensorDataset(torch.arange(6.0).view(6, 1, 1, 1).expand(6, 3, 4, 4)),
                        batch_size=2)
    got = [b[:, 0, 0, 0].tolist() for _, b in zip(range(4), batches(loader, channels=3,
                                                                     start=1), strict=False)]
    assert got == [[2.0, 3.0], [4.0, 5.0], [0.0, 1.0], [2.0, 3.0]]  # skips 1, cycles epochs
    with pytest.raises(LwCompileError, match="N,C,H,W"):
        batches(torch.rand(3, 8, 8))


def test_batches_from_default_images_and_a_folder(tmp_path):
    pytest.importorskip("skimage")
    from skimage.io import imsave

    b = next(batches(None, channels=3, batch_size=2, crop=40))
    assert b.shape == (2, 3, 40, 40)
    imsave(tmp_path / "a.png", (torch.rand(30, 30, 3) * 255).byte().numpy())
    imsave(tmp_path / "b.jpg", (torch.rand(30, 40) * 255).byte().numpy())
    b = next(batches(tmp_path, channels=1, batch_size=4, crop=24))
    assert b.shape == (4, 1, 24, 24)


def test_missing_scikit_image_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "skimage", None)
    monkeypatch.setitem(sys.modules, "skimage.data", None)
    load_images.cache_clear()
    with pytest.raises(LwCompileError, match=r"lwcompile\[data\]"):
        next(batches(None))
    load_images.cache_clear()


def test_layerwise_init_fits_the_sub_pixel_upsampler_against_the_shuffled_conv_output():
    """conv -> PReLU -> pixel shuffle became bilinear + LIST under a new name: its LIST is
    fitted on the resized teacher input, to the teacher conv's output pixel-shuffled."""
    from examples.srresnet import SRResNet

    torch.manual_seed(0)
    teacher = SRResNet(scale=2, features=16, blocks=1).eval()
    light = lwcompile.lighten(teacher, (torch.rand(1, 3, 16, 16),))
    pairs = {r.site: r.result_name for r in light.lwcompile_report.applied
             if r.decided_by == "subpixel"}
    assert len(pairs) == 1 and all(site != name for site, name in pairs.items())
    site, name = next(iter(pairs.items()))

    recorded = {}
    hook = teacher.get_submodule(site).register_forward_hook(
        lambda m, a, out: recorded.update(x=a[0], y=out))
    with torch.no_grad():
        teacher(smooth_images(4, seed=7, size=16).expand(-1, 3, -1, -1))  # held out
    hook.remove()

    def held_out_error(student) -> float:
        with torch.no_grad():
            got = student.get_submodule(name)[:2](recorded["x"])  # resize + LIST
            want = F.pixel_shuffle(recorded["y"], 2)
        return float((got - want).pow(2).sum() / want.pow(2).sum())

    before = held_out_error(light)
    errors = init_layerwise(light, teacher, smooth_images(8, seed=1).expand(-1, 3, -1, -1),
                            steps=40, batch_size=4, crop=16)
    assert site in errors and errors[site] < 0.2 * errors.before[site]
    # a random teacher's sub-pixel phases are beyond bilinear + LIST: the fit is partial
    assert held_out_error(light) < 0.2 * before


def test_ground_truth_mixes_the_clean_target_into_the_loss(pair):
    teacher, light = pair
    data = smooth_images(16, seed=2)
    kw = dict(data=data, degrade=add_noise(25), batch_size=4, crop=32, progress=False,
              lr=1e-3, seed=3, steps=4, bn_batches=0, channels_last=False)
    teacher_only = distill(copy.deepcopy(light), teacher, **kw)
    assert_same_state(distill(copy.deepcopy(light), teacher, ground_truth=0.0, **kw),
                      teacher_only)  # 0: the default, exactly
    # 1: the teacher's outputs weigh nothing, so another teacher trains the same student
    other = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    target_only = distill(copy.deepcopy(light), teacher, ground_truth=1.0, **kw)
    assert_same_state(distill(copy.deepcopy(light), other, ground_truth=1.0, **kw), target_only)
    # and it trains against the clean crops: the same steps by hand give the same weights
    by_hand = copy.deepcopy(light).train()
    opt = torch.optim.Adam(by_hand.parameters(), lr=1e-3)
    from lwcompile.train.data import model_examples

    stream = model_examples(data, teacher, 1, add_noise(25), 4, 32, 3)
    for _, x, clean in itertools.islice(stream, 4):
        loss = F.l1_loss(by_hand(x), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
    sa, sb = by_hand.state_dict(), target_only.state_dict()
    assert all(torch.allclose(sa[k].float(), sb[k].float(), atol=1e-6) for k in sa)
    half = distill(copy.deepcopy(light), teacher, ground_truth=0.5, **kw)
    for model in (teacher_only, target_only):
        with pytest.raises(AssertionError):
            assert_same_state(half, model)


def test_ground_truth_needs_targets_and_a_weight_in_0_1(pair):
    teacher, light = pair
    student = copy.deepcopy(light)
    before = copy.deepcopy(student.state_dict())
    # clean images without a degradation: inputs only, no targets
    with pytest.raises(lwcompile.ArgumentError, match="ground_truth needs clean targets"):
        distill(student, teacher, smooth_images(8, seed=1), steps=2, batch_size=4, crop=32,
                progress=False, ground_truth=0.5)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    for bad in (-0.1, 1.5, True, "0.5", float("nan")):
        with pytest.raises(lwcompile.ArgumentError, match="ground_truth must be a weight"):
            distill(student, teacher, smooth_images(8, seed=1), steps=1, progress=False,
                    ground_truth=bad)


def test_model_examples_give_the_data_own_targets(tmp_path):
    from lwcompile.train.data import model_examples

    x, y = torch.rand(8, 1, 16, 16), torch.rand(8, 1, 16, 16)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    (_, got_x, got_y), = itertools.islice(
        model_examples(loader, DnCNN(features=8, depth=3), 1, None, 4, None, 0), 1)
    assert torch.equal(got_x, x[:4]) and torch.equal(got_y, y[:4])
    # a second element that is not an image (names, labels) is no target
    named = [(x[:4], ["a", "b", "c", "d"])]
    (_, _, no_target), = itertools.islice(
        model_examples(named, DnCNN(features=8, depth=3), 1, None, 4, None, 0), 1)
    assert no_target is None
    # an image tensor without a degradation has no target
    (_, _, none), = itertools.islice(
        model_examples(x, DnCNN(features=8, depth=3), 1, None, 4, 8, 0), 1)
    assert none is None


def test_ground_truth_of_another_shape_is_a_training_error(pair):
    teacher, light = pair
    x, y = torch.rand(8, 1, 16, 16), torch.rand(8, 1, 32, 32)  # targets at twice the size
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    with pytest.raises(lwcompile.TrainingError, match="differs from the data's target 4x1x32x32"):
        distill(copy.deepcopy(light), teacher, loader, steps=1, progress=False,
                ground_truth=0.5)
