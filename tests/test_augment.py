"""AugmentPipe (spec §6): near-identity at p=0, exact pixel blitting, label columns and their meaning,
the RNG draw order, geometry checked by where a bright dot lands, colour transforms, 1 and 3 channels."""

import math

import numpy as np
import pytest
import torch

from edm_fast.augment import AugmentPipe, augment_label_dim

EDM = dict(xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
TINY = 1e-12  # a multiplier that keeps an option's label columns but (practically) never applies it
R = 64


def _random_images(n=8, c=3, res=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand([n, c, res, res], generator=g) * 2 - 1


def _edm_draws(seed, N, p, m=None, device='cpu'):
    """Replay the global-RNG draws of spec §6.3 for the EDM options (multipliers m) in the documented order."""
    m = dict(EDM, **(m or {}))
    torch.manual_seed(seed)

    def gate(w, prob, shape):
        return torch.where(torch.rand(shape, device=device) < prob, w, torch.zeros_like(w))

    d = {}
    d['xflip'] = gate(torch.randint(2, [N, 1, 1, 1], device=device), m['xflip'] * p, [N, 1, 1, 1]).reshape(N)
    d['yflip'] = gate(torch.randint(2, [N, 1, 1, 1], device=device), m['yflip'] * p, [N, 1, 1, 1]).reshape(N)
    d['scale'] = gate(torch.randn([N], device=device), m['scale'] * p, [N])
    d['theta'] = gate((torch.rand([N], device=device) * 2 - 1) * math.pi, m['rotate_frac'] * p, [N])
    z = torch.randn([N], device=device)
    r = (torch.rand([N], device=device) * 2 - 1) * math.pi
    d['aniso'] = gate(z, m['aniso'] * p, [N])
    d['aniso_r'] = gate(r, 0.5, [N])
    d['translate'] = gate(torch.randn([2, N], device=device), m['translate_frac'] * p, [1, N])
    return d


def _edm_labels(d):
    return torch.stack([d['xflip'].float(), d['yflip'].float(), d['scale'], d['theta'].cos() - 1, d['theta'].sin(),
                        d['aniso'] * d['aniso_r'].cos(), d['aniso'] * d['aniso_r'].sin(),
                        d['translate'][0], d['translate'][1]], dim=1)


def _forward_matrix(d, k, res=R):
    """2x2 forward map (input offset from the centre -> output offset) and translation for image k."""
    def rot(t):
        return np.array([[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]])
    s = 2 ** (0.2 * float(d['scale'][k]))
    sa = 2 ** (0.2 * float(d['aniso'][k]))
    r = float(d['aniso_r'][k])
    G_inv = np.diag([1 / s, 1 / s]) @ rot(float(d['theta'][k])) @ rot(-r) @ np.diag([1 / sa, sa]) @ rot(r)
    A = np.linalg.inv(G_inv)
    t = np.array([float(d['translate'][0][k]), float(d['translate'][1][k])]) * res * 0.125
    F = np.diag([-1.0 if d['xflip'][k] else 1.0, -1.0 if d['yflip'][k] else 1.0])
    return A @ F, t  # input = G_inv (output - t), so output offset = A F p + t


def _dot_image(px, py, c=1, sigma=1.5, res=R):
    y, x = torch.meshgrid(torch.arange(res, dtype=torch.float32), torch.arange(res, dtype=torch.float32),
                          indexing='ij')
    dot = torch.exp(-((x - px) ** 2 + (y - py) ** 2) / (2 * sigma ** 2)) * 2 - 1  # background -1, peak +1
    return dot[None, None].repeat(1, c, 1, 1)


def _centroid(image, near=None, radius=8):
    """Intensity centroid (x, y) of the dot above the -1 background; only within `radius` of `near` if given
    (zooming out brings mirrored copies of the dot in from the reflect padding)."""
    w = (image[0] + 1).clamp(min=0)
    w = torch.where(w > 0.05, w, torch.zeros_like(w))  # ignore the filters' faint ringing
    y, x = torch.meshgrid(torch.arange(image.shape[-2], dtype=torch.float32),
                          torch.arange(image.shape[-1], dtype=torch.float32), indexing='ij')
    if near is not None:
        w = torch.where((x - float(near[0])).abs().le(radius) & (y - float(near[1])).abs().le(radius), w, 0)
    return np.array([float((w * x).sum() / w.sum()), float((w * y).sum() / w.sum())])


# ----------------------------------------------------------------------------------------------------


def test_p0_is_near_identity_with_zero_labels():
    images = _random_images()
    pipe = AugmentPipe(p=0, **EDM)
    out, labels = pipe(images)
    assert labels.shape == (8, 9) and labels.dtype == torch.float32
    assert torch.count_nonzero(labels) == 0
    delta = (out - images).abs()
    assert delta.max() < 2e-5 and delta.mean() < 1e-6
    assert delta.max() > 0  # the geometric path really ran (NVlabs runs it for every image)
    all_options = AugmentPipe(p=0, **EDM, rotate_int=1, translate_int=1, brightness=1, contrast=1, lumaflip=1,
                              hue=1, saturation=1)
    out, labels = all_options(images)
    assert labels.shape == (8, 19) and torch.count_nonzero(labels) == 0
    assert (out - images).abs().max() < 2e-5


@pytest.mark.parametrize('option, dim', [('xflip', 3), ('yflip', 2)])
def test_flips_are_exact(option, dim):
    images = _random_images(16)
    torch.manual_seed(1)
    out, labels = AugmentPipe(p=1, **{option: 1})(images)
    assert labels.shape == (16, 1)
    bits = labels[:, 0]
    assert set(bits.tolist()) == {0.0, 1.0}
    for k in range(16):
        expected = images[k].flip(dim - 1) if bits[k] == 1 else images[k]
        assert torch.equal(out[k], expected)


def test_edm_xflip_is_a_fair_coin_whatever_p():
    images = torch.zeros([4000, 1, 2, 2])
    torch.manual_seed(0)
    _, labels = AugmentPipe(p=0.12, xflip=1e8, yflip=1)(images)
    assert 0.46 < labels[:, 0].mean() < 0.54
    assert 0.03 < labels[:, 1].mean() < 0.09  # yflip: active with p, then a coin: p/2 = 0.06


@pytest.mark.parametrize('p', [0.5, 1.0])
def test_edm_labels_follow_the_documented_draw_order(p):
    images = _random_images(32, res=16)
    torch.manual_seed(123)
    _, labels = AugmentPipe(p=p, **EDM)(images)
    expected = _edm_labels(_edm_draws(123, 32, p))
    assert torch.equal(labels, expected)
    if p < 1:  # the gates really gate: some, not all, images get each augmentation
        assert 0 < torch.count_nonzero(labels[:, 2]) < 32


def test_rng_determinism():
    images = _random_images(4)
    pipe = AugmentPipe(p=0.5, **EDM)
    torch.manual_seed(7)
    a = pipe(images)
    torch.manual_seed(7)
    b = pipe(images)
    torch.manual_seed(8)
    c = pipe(images)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[1], c[1])


@pytest.mark.parametrize('option', ['scale', 'rotate_frac', 'aniso', 'translate_frac'])
def test_single_geometric_option_moves_a_dot_as_predicted(option):
    # All nine EDM columns are present; only `option` is ever applied.
    multipliers = {k: TINY for k in EDM}
    multipliers[option] = 1
    pipe = AugmentPipe(p=1, **multipliers)
    c = (R - 1) / 2
    p_in = np.array([10.0, 5.0])
    image = _dot_image(c + p_in[0], c + p_in[1])
    columns = {'scale': [2], 'rotate_frac': [3, 4], 'aniso': [5, 6], 'translate_frac': [7, 8]}[option]
    for seed in range(3):
        torch.manual_seed(seed)
        out, labels = pipe(image)
        d = _edm_draws(seed, 1, 1, multipliers)
        assert torch.equal(labels, _edm_labels(d))
        others = [i for i in range(9) if i not in columns]
        assert torch.count_nonzero(labels[:, others]) == 0
        assert torch.count_nonzero(labels[:, columns]) > 0
        A, t = _forward_matrix(d, 0)
        predicted = c + A @ p_in + t
        np.testing.assert_allclose(_centroid(out[0], near=predicted), predicted, atol=0.15)


def test_scale_column_is_z_and_scale_is_2_pow_0p2z():
    pipe = AugmentPipe(p=1, **{**{k: TINY for k in EDM}, 'scale': 1})
    c = (R - 1) / 2
    image = _dot_image(c + 12, c - 8)
    torch.manual_seed(0)
    out, labels = pipe(image)
    z = float(labels[0, 2])
    s = 2 ** (0.2 * z)
    assert abs(z) > 0.5  # a clearly visible scale for this seed
    np.testing.assert_allclose(_centroid(out[0]), [c + 12 * s, c - 8 * s], atol=0.15)


def test_all_edm_options_together_move_a_dot_as_predicted():
    pipe = AugmentPipe(p=1, **EDM)
    c = (R - 1) / 2
    p_in = np.array([6.0, 3.0])
    image = _dot_image(c + p_in[0], c + p_in[1])
    checked = 0
    for seed in range(6):
        d = _edm_draws(seed, 1, 1)
        A, t = _forward_matrix(d, 0)
        predicted = c + A @ p_in + t
        if not np.all((predicted > 10) & (predicted < R - 11)):
            continue  # the dot would leave the frame
        torch.manual_seed(seed)
        out, labels = pipe(image)
        assert torch.equal(labels, _edm_labels(d))
        np.testing.assert_allclose(_centroid(out[0], near=predicted), predicted, atol=0.2)
        checked += 1
    assert checked >= 3


def test_one_and_three_channels_agree():
    gray = _random_images(4, c=1)
    rgb = gray.repeat(1, 3, 1, 1)
    pipe = AugmentPipe(p=0.8, **EDM)
    torch.manual_seed(3)
    out1, labels1 = pipe(gray)
    torch.manual_seed(3)
    out3, labels3 = pipe(rgb)
    assert out1.shape == (4, 1, 32, 32) and out3.shape == (4, 3, 32, 32)
    assert torch.equal(labels1, labels3)
    for ch in range(3):
        torch.testing.assert_close(out3[:, ch:ch + 1], out1, atol=1e-6, rtol=0)


def test_integer_rotation_is_exact():
    images = _random_images(16, res=8)
    torch.manual_seed(0)
    out, labels = AugmentPipe(p=1, rotate_int=1)(images)
    assert labels.shape == (16, 2)
    seen = set()
    for k in range(16):
        a, b = int(labels[k, 0]), int(labels[k, 1])
        w = {(0, 0): 0, (1, 0): 1, (1, 1): 2, (0, 1): 3}[(a, b)]
        seen.add(w)
        # w quarter turns: flip W if w in {1, 2}, flip H if w in {2, 3}, transpose if w in {1, 3}.
        expected = images[k]
        if w in (1, 2):
            expected = expected.flip(2)
        if w in (2, 3):
            expected = expected.flip(1)
        if w in (1, 3):
            expected = expected.transpose(1, 2)
        assert torch.equal(out[k], expected)
    assert seen == {0, 1, 2, 3}


def test_integer_translation_is_exact_with_mirror_padding():
    images = _random_images(8, res=16)
    torch.manual_seed(2)
    out, labels = AugmentPipe(p=1, translate_int=1, translate_int_max=0.25)(images)
    assert labels.shape == (8, 2)
    for k in range(8):
        tx = round(float(labels[k, 0]) * 16 * 0.25)
        ty = round(float(labels[k, 1]) * 16 * 0.25)
        padded = np.pad(images[k].numpy(), [(0, 0), (16, 16), (16, 16)], mode='reflect')  # no edge repeat
        expected = padded[:, 16 + ty:32 + ty, 16 - tx:32 - tx]  # content moves right by tx, up by ty
        np.testing.assert_array_equal(out[k].numpy(), expected)
    assert torch.count_nonzero(labels) > 0


@pytest.mark.parametrize('option, width', [('brightness', 1), ('contrast', 1), ('lumaflip', 1), ('hue', 2),
                                           ('saturation', 1), ('rotate_int', 2), ('translate_int', 2)])
def test_label_widths(option, width):
    pipe = AugmentPipe(p=1, **{option: 1})
    assert pipe.label_dim == width == augment_label_dim(**{option: 1})
    assert pipe(_random_images(2, res=8))[1].shape == (2, width)
    assert AugmentPipe(p=1, **EDM).label_dim == 9
    colour = AugmentPipe(p=1, brightness=1, contrast=1, lumaflip=1, hue=1, saturation=1)
    assert colour(_random_images(2, res=8))[1].shape == (2, 6)


def test_colour_transforms():
    images = _random_images(8, res=8)
    luma = images.mean(dim=1, keepdim=True)
    torch.manual_seed(0)
    out, labels = AugmentPipe(p=1, brightness=1)(images)
    torch.testing.assert_close(out, images + 0.2 * labels[:, 0].reshape(-1, 1, 1, 1), atol=1e-6, rtol=0)
    torch.manual_seed(0)
    out, labels = AugmentPipe(p=1, contrast=1)(images)
    torch.testing.assert_close(out, images * torch.exp2(0.5 * labels[:, 0]).reshape(-1, 1, 1, 1), atol=1e-5,
                               rtol=1e-5)
    for option in ('hue', 'saturation'):  # both leave the luma (mean of r, g, b) unchanged
        torch.manual_seed(0)
        out, labels = AugmentPipe(p=1, **{option: 1})(images)
        torch.testing.assert_close(out.mean(dim=1, keepdim=True), luma, atol=1e-5, rtol=0)
        assert (out - images).abs().max() > 0.05 and torch.count_nonzero(labels) > 0
    torch.manual_seed(0)
    out, labels = AugmentPipe(p=1, lumaflip=1)(images)
    flipped = labels[:, 0].bool()
    assert 0 < int(flipped.sum()) < 8
    torch.testing.assert_close(out[flipped].mean(dim=1), -luma[flipped][:, 0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out - out.mean(dim=1, keepdim=True), images - luma, atol=1e-5, rtol=0)
    # Grayscale: the mean of the RGB rows of the colour matrix.
    gray = _random_images(4, c=1, res=8)
    torch.manual_seed(0)
    out, labels = AugmentPipe(p=1, brightness=1)(gray)
    torch.testing.assert_close(out, gray + 0.2 * labels[:, 0].reshape(-1, 1, 1, 1), atol=1e-6, rtol=0)


def test_init_kwargs_and_errors():
    pipe = AugmentPipe(p=0.12, xflip=1e8, yflip=1)
    assert pipe.init_kwargs == dict(p=0.12, xflip=1e8, yflip=1)
    assert pipe.p == 0.12 and pipe.scale == 0.0 and pipe.scale_std == 0.2
    with pytest.raises(ValueError, match='1 or 3 channels, got 2'):
        AugmentPipe(p=1, brightness=1)(torch.zeros([1, 2, 4, 4]))
    with pytest.raises(ValueError, match=r'float images \[N, C, H, W\]'):
        AugmentPipe(p=1, xflip=1)(torch.zeros([2, 4, 4]))


@pytest.mark.gpu
def test_runs_on_cuda_tensors():
    images = _random_images(8).cuda()
    out, labels = AugmentPipe(p=0, **EDM)(images)
    assert out.device.type == 'cuda' and labels.device.type == 'cuda' and labels.shape == (8, 9)
    assert torch.count_nonzero(labels) == 0 and (out - images).abs().max() < 2e-5
    torch.manual_seed(0)
    out, labels = AugmentPipe(p=1, xflip=1)(images)
    for k in range(8):
        assert torch.equal(out[k], images[k].flip(2) if labels[k, 0] == 1 else images[k])
    # The whole EDM path on the GPU: labels from the documented draws of the CUDA generator, the dot lands
    # where they say, and the resampling agrees with the CPU run of the same matrices.
    pipe = AugmentPipe(p=1, **EDM)
    c = (R - 1) / 2
    image = _dot_image(c + 6, c + 3).cuda()
    checked = 0
    for seed in range(6):
        d = _edm_draws(seed, 1, 1, device='cuda')
        A, t = _forward_matrix(d, 0)
        predicted = c + A @ np.array([6.0, 3.0]) + t
        if not np.all((predicted > 10) & (predicted < R - 11)):
            continue
        torch.manual_seed(seed)
        out, labels = pipe(image)
        assert torch.equal(labels, _edm_labels(d))
        np.testing.assert_allclose(_centroid(out[0].cpu(), near=predicted), predicted, atol=0.2)
        torch.manual_seed(seed)
        flipped = pipe._pixel_blitting(image, [])
        G_inv = pipe._geometric_matrix(flipped, [])
        on_cpu = pipe._geometric_resample(flipped.cpu(), G_inv.cpu())
        torch.testing.assert_close(out.cpu(), on_cpu, atol=1e-5, rtol=0)
        checked += 1
    assert checked >= 2
