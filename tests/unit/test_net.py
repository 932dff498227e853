"""DRCRNet layout (checkpoint keys, parameter count, cost) and forward semantics (spec §2–§3)."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from drcr_model.net import NPM, DRCRNet, receptive_radius

DATA = Path(__file__).parent / "data"
TINY = {"in_channels": 3, "out_channels": 31, "channels": 8, "n_blocks": 1}


def read_tsv() -> list[tuple[str, list[int]]]:
    rows = []
    for line in (DATA / "drcr_state_dict_keys.tsv").read_text().splitlines():
        if line.strip():
            key, shape = line.split("\t")
            rows.append((key, [int(s) for s in shape.strip("[]").split(",")]))
    return rows


@pytest.fixture(scope="module")
def full_model() -> DRCRNet:
    torch.manual_seed(0)
    return DRCRNet().eval()


def tiny_model(seed: int = 0, **overrides: int) -> DRCRNet:
    torch.manual_seed(seed)
    return DRCRNet(**(TINY | overrides)).eval()


# --- layout -------------------------------------------------------------------------------------


def test_state_dict_keys_shapes_and_order_match_tsv(full_model: DRCRNet) -> None:
    expected = read_tsv()
    got = [(k, list(v.shape)) for k, v in full_model.state_dict().items()]
    assert len(expected) == 206
    assert got == expected


def test_no_buffers_and_all_float32(full_model: DRCRNet) -> None:
    assert list(full_model.buffers()) == []
    assert {p.dtype for p in full_model.parameters()} == {torch.float32}


@pytest.mark.parametrize(
    ("config", "count"),
    [((3, 31, 100, 10), 9_478_482), ((3, 31, 200, 8), 31_322_802)],
)
def test_parameter_count(config: tuple[int, int, int, int], count: int) -> None:
    with torch.device("meta"):  # shapes only; no 31M-parameter initialisation on the CPU
        model = DRCRNet(*config)
    assert sum(p.numel() for p in model.parameters()) == count


@pytest.mark.parametrize("config", [(3, 31, 100, 10), (3, 31, 200, 8), (3, 31, 16, 1), (4, 7, 24, 3)])
def test_parameter_count_closed_form(config: tuple[int, int, int, int]) -> None:
    inp, planes, c, n = config
    r = c // 8
    closed = (
        9 * inp * c
        + 9 * c * c
        + (111 * c * c + 10 * c)
        + n * (81 * c * c + 6 * c + 4 * c * r + 2 * r * r)
        + 9 * c * c
        + 9 * planes * c
        + 2
    )
    with torch.device("meta"):
        model = DRCRNet(*config)
    assert sum(p.numel() for p in model.parameters()) == closed


def test_unused_npm_parameters_count(full_model: DRCRNet) -> None:
    unused = sum(
        p.numel() for n, p in full_model.named_parameters() if n.startswith(("denosing.conv4_33", "denosing.conv4_11"))
    )
    assert unused == 100_200


def test_macs_per_pixel_closed_form(full_model: DRCRNet) -> None:
    assert full_model.macs_per_pixel() == 8_948_100
    c, n = 32, 2
    assert DRCRNet(3, 31, c, n).macs_per_pixel() == int((81.75 + 81 * n) * c * c + 9 * 3 * c + 9 * 31 * c)


def test_macs_per_pixel_matches_flop_counter() -> None:
    """The closed form equals what FlopCounterMode counts for convolutions (2 FLOP per MAC)."""
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_model(channels=16, n_blocks=2)
    h, w = 16, 12
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(torch.rand(1, 3, h, w))
    conv_flops = counter.get_flop_counts()["Global"][torch.ops.aten.convolution]
    assert conv_flops == 2 * model.macs_per_pixel() * h * w


def test_constructor_validation() -> None:
    with pytest.raises(ValueError, match="channels"):
        DRCRNet(channels=4)
    with pytest.raises(ValueError, match="n_blocks"):
        DRCRNet(n_blocks=0)


# --- shapes and input constraints ------------------------------------------------------------------


@pytest.mark.parametrize(("b", "h", "w"), [(1, 4, 4), (2, 8, 12), (3, 12, 8), (1, 16, 16), (2, 20, 4)])
def test_output_shape(b: int, h: int, w: int) -> None:
    model = tiny_model()
    with torch.no_grad():
        y = model(torch.rand(b, 3, h, w))
    assert y.shape == (b, 31, h, w)
    assert y.dtype == torch.float32


def test_full_config_forward_shape(full_model: DRCRNet) -> None:
    with torch.no_grad():
        y = full_model(torch.rand(1, 3, 4, 8))
    assert y.shape == (1, 31, 4, 8)


@pytest.mark.parametrize(("h", "w"), [(5, 8), (6, 8), (7, 8), (9, 8), (10, 8), (8, 10), (8, 6), (2, 8), (8, 2), (0, 4)])
def test_rejects_sizes_not_multiple_of_4(h: int, w: int) -> None:
    with pytest.raises(ValueError, match=rf"multiples of 4.*{h}x{w}"):
        tiny_model()(torch.rand(1, 3, h, w))


def test_batch_samples_are_independent() -> None:
    model = tiny_model()
    x = torch.rand(3, 3, 8, 8)
    with torch.no_grad():
        batched = model(x)
        single = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(batched, single, rtol=1e-5, atol=1e-6)


def test_train_and_eval_give_same_output() -> None:
    model = tiny_model()
    x = torch.rand(2, 3, 8, 12)
    with torch.no_grad():
        y_eval = model.eval()(x)
        y_train = model.train()(x)
    assert torch.equal(y_eval, y_train)


def test_backward_reaches_all_used_parameters() -> None:
    model = tiny_model().train()
    model(torch.rand(1, 3, 8, 8)).square().mean().backward()
    # grad None = not in the autograd graph at all (a zero grad can come from a dead ReLU in the CRM).
    no_grad = sorted(n for n, p in model.named_parameters() if p.grad is None)
    assert no_grad == [
        "denosing.conv4_11.bias",
        "denosing.conv4_11.weight",
        "denosing.conv4_33.bias",
        "denosing.conv4_33.weight",
    ]


# --- independent semantics checks ---------------------------------------------------------------


def bilinear_up_spec(t: np.ndarray, s: int) -> np.ndarray:
    """Spec §3.2 upsampling written out per axis: c = (o + 0.5)/S - 0.5 clamped at 0 (align_corners=False)."""

    def axis(a: np.ndarray, ax: int) -> np.ndarray:
        n = a.shape[ax]
        o = np.arange(n * s)
        c = np.maximum((o + 0.5) / s - 0.5, 0.0)
        i0 = np.floor(c).astype(int)
        i1 = np.minimum(i0 + 1, n - 1)
        lam = (c - i0).reshape([-1 if d == ax else 1 for d in range(a.ndim)])
        return (1 - lam) * np.take(a, i0, axis=ax) + lam * np.take(a, i1, axis=ax)

    return axis(axis(t.astype(np.float64), 2), 3)


def npm_reference(m: NPM, f: torch.Tensor) -> np.ndarray:
    """NPM from spec §3.2 with functional ops and the spec's own bilinear formula (float64)."""
    sd = {k: v.double() for k, v in m.state_dict().items()}
    x = f.double()

    def conv(name: str, t: torch.Tensor) -> torch.Tensor:
        w = sd[f"{name}.weight"]
        return F.conv2d(t, w, sd[f"{name}.bias"], padding=w.shape[-1] // 2)

    lrelu = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731
    p2 = F.avg_pool2d(x, 2)
    p4 = F.avg_pool2d(p2, 2)
    a0 = lrelu(conv("conv_0_cat", torch.cat([conv("conv0_33", x), conv("conv0_11", x)], 1)))
    a2 = lrelu(conv("conv_2_cat", torch.cat([conv("conv2_33", p2), conv("conv2_11", p2)], 1)))
    a4 = lrelu(conv("conv_4_cat", torch.cat([conv("conv2_33", p4), conv("conv2_11", p4)], 1)))
    a2 = torch.from_numpy(bilinear_up_spec(a2.numpy(), 2))
    a4 = torch.from_numpy(bilinear_up_spec(a4.numpy(), 4))
    return (x + lrelu(conv("conv_cat", torch.cat([a0, a2, a4], 1)))).numpy()


def test_npm_matches_spec_reference() -> None:
    torch.manual_seed(1)
    m = NPM(8).eval()
    f = torch.randn(2, 8, 8, 12)
    with torch.no_grad():
        got = m(f).numpy()
    np.testing.assert_allclose(got, npm_reference(m, f), rtol=1e-5, atol=1e-5)


def test_bilinear_is_align_corners_false() -> None:
    """The formula used above is PyTorch's default and differs from align_corners=True / nearest."""
    t = torch.randn(1, 2, 3, 5)
    ours = bilinear_up_spec(t.numpy(), 4)
    np.testing.assert_allclose(
        F.interpolate(t, scale_factor=4, mode="bilinear", align_corners=False).numpy(), ours, atol=1e-6
    )
    assert not np.allclose(
        F.interpolate(t, scale_factor=4, mode="bilinear", align_corners=True).numpy(), ours, atol=1e-3
    )
    assert not np.allclose(F.interpolate(t, scale_factor=4, mode="nearest").numpy(), ours, atol=1e-3)


def perturbed_output(model: DRCRNet, prefix: str, x: torch.Tensor) -> torch.Tensor:
    m = copy.deepcopy(model)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith(prefix):
                p.add_(torch.randn_like(p))
        return m(x)


@pytest.mark.parametrize("prefix", ["denosing.conv4_33.", "denosing.conv4_11."])
def test_conv4_npm_weights_are_dead(prefix: str) -> None:
    model = tiny_model()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        base = model(x)
    assert torch.equal(perturbed_output(model, prefix, x), base)


@pytest.mark.parametrize(
    "prefix", ["denosing.conv2_33.", "denosing.conv2_11.", "denosing.conv_4_cat.", "denosing.conv_2_cat."]
)
def test_half_scale_and_quarter_cat_weights_are_used(prefix: str) -> None:
    model = tiny_model()
    x = torch.rand(1, 3, 8, 8)
    with torch.no_grad():
        base = model(x)
    assert (perturbed_output(model, prefix, x) - base).abs().max() > 1e-4


def reference_forward(sd: dict[str, torch.Tensor], x: torch.Tensor, n_blocks: int) -> torch.Tensor:
    """Whole network from spec §3 with functional ops on the state_dict (no module code reused)."""
    lrelu = lambda t: F.leaky_relu(t, 0.2)  # noqa: E731

    def rconv(name: str, t: torch.Tensor) -> torch.Tensor:  # reflect pad 1, 3x3, no bias
        return F.conv2d(F.pad(t, (1, 1, 1, 1), mode="reflect"), sd[f"{name}.conv2d.weight"])

    def zconv(name: str, t: torch.Tensor) -> torch.Tensor:  # zero pad 1, 3x3, bias, LReLU
        return lrelu(F.conv2d(t, sd[f"{name}.conv2d.weight"], sd[f"{name}.conv2d.bias"], padding=1))

    def crm(name: str, z: torch.Tensor) -> torch.Tensor:
        s = z.mean(dim=(2, 3))
        s = torch.relu(s @ sd[f"{name}.fc.0.weight"].T)
        s = torch.relu(s @ sd[f"{name}.fc.2.weight"].T)
        s = torch.sigmoid(s @ sd[f"{name}.fc.4.weight"].T)
        return z * s[:, :, None, None]

    f = F.prelu(rconv("input_conv2D", x), sd["input_prelu2D.weight"])
    f = rconv("head_conv2D", f)
    npm = NPM(f.shape[1])
    npm.load_state_dict({k[len("denosing.") :]: v for k, v in sd.items() if k.startswith("denosing.")})
    f = torch.from_numpy(npm_reference(npm, f)).float()
    for i in range(n_blocks):
        b = f"backbone.{i}"
        x1 = zconv(f"{b}.conv1", f)
        x2 = zconv(f"{b}.conv2", x1)
        x3 = zconv(f"{b}.conv3", x2)
        r = crm(f"{b}.se1", f)
        x4 = zconv(f"{b}.conv4", torch.cat([x3, r], 1))
        x5 = zconv(f"{b}.conv5", torch.cat([x2, x4], 1))
        f = zconv(f"{b}.conv6", torch.cat([x1, x5], 1)) + crm(f"{b}.se2", r)
    f = F.prelu(rconv("tail_conv2D", f), sd["output_prelu2D.weight"])
    return rconv("output_conv2D", f)


def test_whole_network_matches_functional_reference() -> None:
    model = tiny_model(seed=3, channels=16, n_blocks=2)
    with torch.no_grad():  # non-default PReLU slopes so the PReLU placement is exercised
        model.input_prelu2D.weight.fill_(0.1)
        model.output_prelu2D.weight.fill_(-0.3)
        x = torch.rand(2, 3, 8, 12)
        got = model(x)
        want = reference_forward(model.state_dict(), x, n_blocks=2)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


# --- golden regression ----------------------------------------------------------------------------


def test_golden_tiny_output() -> None:
    """Seeded DRCRNet(3, 31, 8, 1) on a fixed input, from tests/unit/data/make_golden.py."""
    golden = np.load(DATA / "golden_tiny.npz")
    torch.manual_seed(int(golden["seed"]))
    model = DRCRNet(**TINY).eval()
    with torch.no_grad():
        y = model(torch.from_numpy(golden["x"])).numpy()
    np.testing.assert_allclose(y, golden["y"], rtol=1e-4, atol=1e-5)


def test_golden_tolerance_detects_the_npm_fix() -> None:
    """The golden tolerance is tight enough to notice "fixing" the conv4 reuse (spec §9.2)."""
    golden = np.load(DATA / "golden_tiny.npz")
    torch.manual_seed(int(golden["seed"]))
    model = DRCRNet(**TINY).eval()
    npm = model.denosing
    with torch.no_grad():
        npm.conv2_33, npm.conv2_11 = npm.conv4_33, npm.conv4_11  # quarter scale now uses conv4_*, half scale too
        y = model(torch.from_numpy(golden["x"])).numpy()
    assert np.abs(y - golden["y"]).max() > 1e-4


@pytest.mark.parametrize("n_blocks", [1, 2, 3])
def test_receptive_radius_is_the_gradient_support(n_blocks: int) -> None:
    """With every CRM mean fixed, an output pixel depends on exactly ``receptive_radius`` px each side
    (the worst over the 16 positions in the 4×4 pooling grid)."""
    torch.manual_seed(0)
    net = DRCRNet(3, 31, 8, n_blocks).double()
    for p in net.parameters():
        torch.nn.init.uniform_(p, -0.5, 0.5)  # generic weights: no weight that happens to cut a path
    means = torch.rand(n_blocks, 8, dtype=torch.float64)
    size, c, reach = 96, 48, 0
    for dy in range(4):
        for dx in range(4):
            x = torch.rand(1, 3, size, size, dtype=torch.float64, requires_grad=True)
            net(x, means)[0, :, c + dy, c + dx].sum().backward()
            assert x.grad is not None
            ys, xs = (x.grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
            reach = max(reach, int((ys - c - dy).abs().max()), int((xs - c - dx).abs().max()))
    assert reach == receptive_radius(n_blocks)
