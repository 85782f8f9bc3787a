"""compiler/sites.py: where rules may rewrite, in execution order, with what is known there."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lwcompile
from lwcompile.compiler.driver import reference_run
from lwcompile.compiler.sites import find_sites, site_types, watched
from lwcompile.compiler.workspace import prepare
from tests.test_compiler_workspace import PadToMultiple

pytestmark = pytest.mark.usefixtures("one_thread")


def _sites(model: nn.Module, x: torch.Tensor, types=(nn.Conv2d,)):
    reference = reference_run(model, (x,), {}, False, types, Counter())
    ws = prepare(model, (x,), {}, reference.run.output, reference.graph_check.region,
                 *reference.take_spares())
    log: list[str] = []
    return find_sites(ws, types, reference.flow, log), log


class ReadsAWeight(nn.Module):
    """Declares its convs out of call order, and reads one conv's weight directly."""

    def __init__(self) -> None:
        super().__init__()
        self.tail = nn.Conv2d(8, 3, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        h = self.head(x)
        h = self.mid(h) + F.conv2d(h, self.mid.weight, padding=1)
        return self.tail(h)


def test_site_types_and_watched_modules_come_from_the_rules():
    rules = lwcompile.default_rules()
    types = site_types(rules)
    assert set(types) == {t for rule in rules for t in rule.applies_to}
    model = ReadsAWeight()
    assert watched(model, (nn.Conv2d,)) == ["tail", "mid", "head"]
    assert watched(model, (nn.Linear,)) == []


def test_sites_come_in_call_order_without_modules_whose_weights_are_read_directly():
    sites, log = _sites(ReadsAWeight(), torch.rand(1, 3, 8, 8))
    assert [s.name for s in sites] == ["head", "tail"]
    assert log == ["mid: left alone, its parameters are also read directly by the model"]
    head = sites[0]
    assert head.input_shapes == (torch.Size([1, 3, 8, 8]),)
    assert head.output_shape == torch.Size([1, 8, 8, 8])
    assert head.node is not None and head.graph_editable and head.region == ""


def test_convs_called_from_opaque_code_are_module_only_sites():
    sites, _ = _sites(PadToMultiple(), torch.rand(1, 3, 12, 12))
    by_name = {s.name: s for s in sites}
    assert list(by_name) == ["head", "body.0", "body.2", "tail"]
    for name in ("head", "tail"):
        assert by_name[name].node is None and not by_name[name].graph_editable
        assert by_name[name].producers == [] and by_name[name].consumers == []
    inner = by_name["body.0"]
    assert inner.region == "body" and inner.graph_editable and inner.node.target == "0"
    assert inner.input_shapes == (torch.Size([1, 32, 16, 16]),)  # padded to a multiple of 8


class Upsamples(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.Conv2d(16, 12, 3, padding=1)

    def forward(self, x):
        h = torch.cat([torch.relu(self.a(x)), self.b(x)], 1)
        return F.pixel_shuffle(torch.relu(self.up(h)), 2)


def test_sites_know_what_their_output_feeds():
    sites, _ = _sites(Upsamples(), torch.rand(1, 3, 8, 8))
    by_name = {s.name: s for s in sites}
    assert by_name["up"].feeds_pixel_shuffle and by_name["up"].pixel_shuffle_factor == 2
    assert not by_name["up"].feeds_concat
    for name in ("a", "b"):  # through a ReLU or directly
        assert by_name[name].feeds_concat and not by_name[name].feeds_pixel_shuffle
        assert by_name[name].pixel_shuffle_factor is None


class ThinInside(nn.Module):
    """PLKSR-like: a large-kernel conv on an 8-channel slice deep inside, in code fx cannot
    trace (item assignment), between the image-reading and the image-writing convs."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Conv2d(3, 3, 1)  # a colour shift before and after, as RCAN's
        self.unshift = nn.Conv2d(3, 3, 1)
        self.head = nn.Conv2d(3, 32, 3, padding=1)
        self.slice_conv = nn.Conv2d(8, 8, 7, padding=3)
        self.mix = nn.Conv2d(32, 12, 1)
        self.late = nn.Conv2d(35, 32, 3, padding=1)  # reads the image again, through a concat
        self.tail = nn.Conv2d(32, 12, 3, padding=1)

    def forward(self, x):
        x = self.shift(x)
        h = torch.relu(self.head(x))
        h = h.clone()
        h[:, :8] = self.slice_conv(h[:, :8])
        h = self.late(torch.cat([h, F.avg_pool2d(x, 3, 1, 1)], 1))
        out = self.unshift(F.pixel_shuffle(self.tail(h), 2))
        return out + F.interpolate(x, scale_factor=2.0, mode="bilinear") + 0 * self.mix(h).mean()


def test_sites_know_whether_they_face_the_image():
    sites, _ = _sites(ThinInside(), torch.rand(1, 3, 8, 8))
    by_name = {s.name: s for s in sites}
    # through a ReLU, a clone, a pool and a concat, and the colour shift, which keeps the
    # channel count: no layer that makes features between
    assert {n for n, s in by_name.items() if s.reads_input} == {"shift", "head", "late"}
    # through a pixel shuffle, the shift back and an add; `mix` reaches the output only
    # through a mean, but no learned layer: it writes the output as well, and so does the
    # shift, whose image reaches it through the bilinear skip
    assert {n for n, s in by_name.items() if s.writes_output} == {
        "unshift", "tail", "mix", "shift"}
    inside = by_name["slice_conv"]
    assert inside.reads_input is False and inside.writes_output is False


def test_a_thin_conv_inside_the_network_is_lightened_and_the_image_layers_are_kept():
    model = ThinInside().eval()
    x = torch.rand(1, 3, 16, 16)
    light = lwcompile.lighten(model, (x,))
    rows = {r.site: r for r in light.lwcompile_report.rows}
    assert rows["slice_conv"].outcome == "applied" and rows["slice_conv"].decided_by == "list"
    assert rows["head"].outcome == "kept" and "reads the model's input" in rows["head"].reason
    assert rows["late"].outcome == "applied"  # 35->32: not few channels
    assert light(x).shape == model(x).shape
    # a site whose facing is unknown (built by hand) is judged by its channels alone
    from lwcompile.rule import Proposal, Site
    from lwcompile.rules.image_boundary import ImageBoundaryGuard
    from lwcompile.rules.list_conv import ListRule

    conv = nn.Conv2d(8, 8, 7, padding=3)
    unknown = Site("c", conv, (torch.Size([1, 8, 8, 8]),), torch.Size([1, 8, 8, 8]))
    veto = ImageBoundaryGuard().check(Proposal(ListRule(), lwcompile.Match(unknown), None))
    assert veto is not None and veto.reason.startswith("image-facing layer (8->8 channels, "
                                                       "fewer than 16)")
    inside = Site("c", conv, unknown.input_shapes, unknown.output_shape, reads_input=False,
                  writes_output=False)
    assert ImageBoundaryGuard().check(Proposal(ListRule(), lwcompile.Match(inside), None)) is None
