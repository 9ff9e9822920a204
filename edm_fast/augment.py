"""The non-leaky augmentation pipe of EDM (StyleGAN2-ADA's pipeline without the noise/cutout parts).

`AugmentPipe(**options)(images) -> (images, augment_labels)` follows spec §6 step by step: the same
options, the same random draws in the same order from the global torch RNG of the images' device, the
same matrices and the same resampling path (reflect pad, 2x sym6 upsampling, bilinear grid_sample, 2x
downsampling), so with the same RNG state it produces the same images and labels as NVlabs.

Conventions: images are float [N, C, H, W] (in EDM [-1, 1]); 2-D geometry is done with 3x3 homogeneous
matrices in pixel units centred on the image, G_inv mapping output coordinates to input coordinates;
colour with 4x4 matrices acting on (r, g, b, 1). Matrices are float32, batched as [N, 3, 3] / [N, 4, 4].

Public API: `AugmentPipe`, `augment_label_dim`.
"""

import numpy as np
import torch

from .util import record_init_kwargs

__all__ = ['AugmentPipe', 'augment_label_dim', 'SYM6']

# Low-pass decomposition filter of the sym6 wavelet (12 taps); the anti-aliasing filter of the geometric path.
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)

# ----------------------------------------------------------------------------------------------------
# Constants and matrices.

_constant_cache = {}


def _constant(value, shape=None, dtype=None, device=None):
    """A cached tensor holding `value` (a number or array), broadcast to `shape`. Never modify the result."""
    value = np.asarray(value)
    shape = tuple(shape) if shape is not None else None
    dtype = dtype if dtype is not None else torch.get_default_dtype()
    device = torch.device(device) if device is not None else torch.device('cpu')
    key = (value.shape, value.dtype.str, value.tobytes(), shape, dtype, device)
    tensor = _constant_cache.get(key)
    if tensor is None:
        tensor = torch.as_tensor(value.copy(), dtype=dtype, device=device)
        if shape is not None:
            tensor = torch.broadcast_to(tensor, shape).contiguous()
        if len(_constant_cache) < 4096:
            _constant_cache[key] = tensor
    return tensor


def _matrix(*rows, device=None):
    """Batched matrix from rows of numbers and/or tensors of one shape S -> float32 [*S, len(rows), len(row)]."""
    elems = [x for row in rows for x in row]
    tensors = [x for x in elems if isinstance(x, torch.Tensor)]
    if not tensors:
        return _constant(np.asarray(rows), device=device)
    ref = tensors[0]
    elems = [x if isinstance(x, torch.Tensor) else _constant(x, shape=ref.shape, device=ref.device) for x in elems]
    return torch.stack(elems, dim=-1).reshape(ref.shape + (len(rows), -1))


def translate2d(tx, ty, device=None):
    return _matrix([1, 0, tx], [0, 1, ty], [0, 0, 1], device=device)


def scale2d(sx, sy, device=None):
    return _matrix([sx, 0, 0], [0, sy, 0], [0, 0, 1], device=device)


def rotate2d(theta, device=None):
    """Counter-clockwise in (x right, y up) coordinates: [[cos, -sin], [sin, cos]]."""
    return _matrix([torch.cos(theta), -torch.sin(theta), 0], [torch.sin(theta), torch.cos(theta), 0], [0, 0, 1],
                   device=device)


def translate2d_inv(tx, ty, device=None):
    return translate2d(-tx, -ty, device=device)


def scale2d_inv(sx, sy, device=None):
    return scale2d(1 / sx, 1 / sy, device=device)


def rotate2d_inv(theta, device=None):
    return rotate2d(-theta, device=device)


def translate3d(tx, ty, tz, device=None):
    return _matrix([1, 0, 0, tx], [0, 1, 0, ty], [0, 0, 1, tz], [0, 0, 0, 1], device=device)


def scale3d(sx, sy, sz, device=None):
    return _matrix([sx, 0, 0, 0], [0, sy, 0, 0], [0, 0, sz, 0], [0, 0, 0, 1], device=device)


def rotate3d(v, theta, device=None):
    """Rotation by theta about the unit axis v (Rodrigues: c*I + s*[v]x + (1 - c)*v v^T), in 4x4 form."""
    vx, vy, vz = v[..., 0], v[..., 1], v[..., 2]
    s, c = torch.sin(theta), torch.cos(theta)
    cc = 1 - c
    return _matrix([vx * vx * cc + c, vx * vy * cc - vz * s, vx * vz * cc + vy * s, 0],
                   [vy * vx * cc + vz * s, vy * vy * cc + c, vy * vz * cc - vx * s, 0],
                   [vz * vx * cc - vy * s, vz * vy * cc + vx * s, vz * vz * cc + c, 0],
                   [0, 0, 0, 1], device=device)


# ----------------------------------------------------------------------------------------------------
# The sym6 resampling path.


def _upsample2x(images, Hz):
    """[N, C, H, W] -> [N, C, 2H, 2W]: zero-interleave, then convolve with Hz (true convolution), per axis."""
    N, C = images.shape[:2]
    weight = _constant(np.asarray(Hz)[::-1], dtype=images.dtype, device=images.device)[None, None, :].tile([C, 1, 1])
    pad = (len(Hz) + 1) // 2
    images = torch.stack([images, torch.zeros_like(images)], dim=4).reshape(N, C, images.shape[2], -1)[:, :, :, :-1]
    images = torch.nn.functional.conv2d(images, weight.unsqueeze(2), groups=C, padding=[0, pad])
    images = torch.stack([images, torch.zeros_like(images)], dim=3).reshape(N, C, -1, images.shape[3])[:, :, :-1, :]
    images = torch.nn.functional.conv2d(images, weight.unsqueeze(3), groups=C, padding=[pad, 0])
    return images


def _downsample2x_crop(images, Hz, crop):
    """[N, C, H, W] -> [N, C, H/2 - 2*crop, W/2 - 2*crop]: filter with Hz at stride 2, crop each side, per axis."""
    C = images.shape[1]
    weight = _constant(np.asarray(Hz), dtype=images.dtype, device=images.device)[None, None, :].tile([C, 1, 1])
    pad = (len(Hz) - 1) // 2
    images = torch.nn.functional.conv2d(images, weight.unsqueeze(2), groups=C, stride=[1, 2], padding=[0, pad])
    images = images[:, :, :, crop:-crop]
    images = torch.nn.functional.conv2d(images, weight.unsqueeze(3), groups=C, stride=[2, 1], padding=[pad, 0])
    return images[:, :, crop:-crop, :]


# ----------------------------------------------------------------------------------------------------


def _gate(w, prob, shape):
    """Keep w where a fresh uniform draw of `shape` (global RNG, w's device) is below prob, else 0."""
    return torch.where(torch.rand(shape, device=w.device) < prob, w, torch.zeros_like(w))


_LABEL_WIDTHS = (('xflip', 1), ('yflip', 1), ('rotate_int', 2), ('translate_int', 2), ('scale', 1),
                 ('rotate_frac', 2), ('aniso', 2), ('translate_frac', 2), ('brightness', 1), ('contrast', 1),
                 ('lumaflip', 1), ('hue', 2), ('saturation', 1))


def augment_label_dim(**options):
    """Width of the augment labels for these AugmentPipe options (9 for EDM's configuration)."""
    return sum(width for name, width in _LABEL_WIDTHS if options.get(name, 0) > 0)


@record_init_kwargs
class AugmentPipe:
    """EDM's augmentation pipe: `pipe(images) -> (images, labels)` (spec §6).

    images: float [N, C, H, W] on any device (C = 1 or 3 when colour options are on; H = W for
    rotate_int). Returns the augmented images (same shape and dtype) and labels float32 [N, D],
    D = `self.label_dim`, one group of columns per enabled option in the order of spec §6.2, all zero
    for an image that was not augmented. Each option is applied to an image with probability
    min(multiplier * p, 1); the random draws use the global torch RNG of the images' device.

    EDM: AugmentPipe(p=0.12, xflip=1e8, yflip=1, scale=1, rotate_frac=1, aniso=1, translate_frac=1)
    gives 9 label columns: xflip bit, yflip bit, scale z, cos(theta) - 1, sin(theta), z*cos(r), z*sin(r),
    translate z_x, z_y.
    """

    def __init__(self, p=1,
                 xflip=0, yflip=0, rotate_int=0, translate_int=0, translate_int_max=0.125,
                 scale=0, rotate_frac=0, aniso=0, translate_frac=0, scale_std=0.2, rotate_frac_max=1,
                 aniso_std=0.2, aniso_rotate_prob=0.5, translate_frac_std=0.125,
                 brightness=0, contrast=0, lumaflip=0, hue=0, saturation=0, brightness_std=0.2,
                 contrast_std=0.5, hue_max=1, saturation_std=1):
        self.p = float(p)
        self.xflip = float(xflip)
        self.yflip = float(yflip)
        self.rotate_int = float(rotate_int)
        self.translate_int = float(translate_int)
        self.translate_int_max = float(translate_int_max)
        self.scale = float(scale)
        self.rotate_frac = float(rotate_frac)
        self.aniso = float(aniso)
        self.translate_frac = float(translate_frac)
        self.scale_std = float(scale_std)
        self.rotate_frac_max = float(rotate_frac_max)
        self.aniso_std = float(aniso_std)
        self.aniso_rotate_prob = float(aniso_rotate_prob)
        self.translate_frac_std = float(translate_frac_std)
        self.brightness = float(brightness)
        self.contrast = float(contrast)
        self.lumaflip = float(lumaflip)
        self.hue = float(hue)
        self.saturation = float(saturation)
        self.brightness_std = float(brightness_std)
        self.contrast_std = float(contrast_std)
        self.hue_max = float(hue_max)
        self.saturation_std = float(saturation_std)
        self.Hz_geom = SYM6

    @property
    def label_dim(self):
        """Number of label columns this pipe produces."""
        return augment_label_dim(**{name: getattr(self, name) for name, _ in _LABEL_WIDTHS})

    def __repr__(self):
        args = ', '.join(f'{k}={v!r}' for k, v in self.init_kwargs.items())
        return f'AugmentPipe({args})'

    def __call__(self, images):
        if images.ndim != 4 or not images.is_floating_point():
            raise ValueError(f'AugmentPipe expects float images [N, C, H, W], got {tuple(images.shape)} '
                             f'{images.dtype}')
        N = images.shape[0]
        labels = [torch.zeros([N, 0], device=images.device)]
        images = self._pixel_blitting(images, labels)
        G_inv = self._geometric_matrix(images, labels)
        if G_inv is not None:
            images = self._geometric_resample(images, G_inv)
        M = self._colour_matrix(images, labels)
        if M is not None:
            images = self._colour_transform(images, M)
        labels = torch.cat([x.to(torch.float32).reshape(N, -1) for x in labels], dim=1)
        return images, labels

    # ------------------------------------------------------------------------------------------------

    def _pixel_blitting(self, images, labels):
        """Flips, quarter turns and integer translations: exact pixel permutations."""
        N, C, H, W = images.shape
        device = images.device
        if self.xflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1, 1], device=device), self.xflip * self.p, [N, 1, 1, 1])
            images = torch.where(w == 1, images.flip(3), images)
            labels.append(w)
        if self.yflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1, 1], device=device), self.yflip * self.p, [N, 1, 1, 1])
            images = torch.where(w == 1, images.flip(2), images)
            labels.append(w)
        if self.rotate_int > 0:
            if H != W:
                raise ValueError(f'AugmentPipe(rotate_int) needs square images, got {H}x{W}')
            w = _gate(torch.randint(4, [N, 1, 1, 1], device=device), self.rotate_int * self.p, [N, 1, 1, 1])
            images = torch.where((w == 1) | (w == 2), images.flip(3), images)
            images = torch.where((w == 2) | (w == 3), images.flip(2), images)
            images = torch.where((w == 1) | (w == 3), images.transpose(2, 3), images)
            labels += [(w == 1) | (w == 2), (w == 2) | (w == 3)]
        if self.translate_int > 0:
            w = _gate(torch.rand([2, N, 1, 1, 1], device=device) * 2 - 1, self.translate_int * self.p,
                           [1, N, 1, 1, 1])
            tx = w[0].mul(W * self.translate_int_max).round().to(torch.int64)
            ty = w[1].mul(H * self.translate_int_max).round().to(torch.int64)
            b, c, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in images.shape), indexing='ij')
            # Mirror-reflect indexing (period 2W - 2): edge pixels are not repeated.
            x = W - 1 - (W - 1 - (x - tx) % (W * 2 - 2)).abs()
            y = H - 1 - (H - 1 - (y + ty) % (H * 2 - 2)).abs()
            images = images[b, c, y, x]
            labels += [tx.div(W * self.translate_int_max), ty.div(H * self.translate_int_max)]
        return images

    def _geometric_matrix(self, images, labels):
        """float32 [N, 3, 3] output->input matrix in centred pixel units, or None if no geometric option is on."""
        N, C, H, W = images.shape
        device = images.device
        if not (self.scale > 0 or self.rotate_frac > 0 or self.aniso > 0 or self.translate_frac > 0):
            return None
        G_inv = torch.eye(3, device=device)
        if self.scale > 0:
            w = _gate(torch.randn([N], device=device), self.scale * self.p, [N])
            s = w.mul(self.scale_std).exp2()
            G_inv = G_inv @ scale2d_inv(s, s)
            labels.append(w)
        if self.rotate_frac > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.rotate_frac_max)
            w = _gate(w, self.rotate_frac * self.p, [N])
            G_inv = G_inv @ rotate2d_inv(-w)
            labels += [w.cos() - 1, w.sin()]
        if self.aniso > 0:
            w = torch.randn([N], device=device)
            r = (torch.rand([N], device=device) * 2 - 1) * np.pi
            w = _gate(w, self.aniso * self.p, [N])
            r = _gate(r, self.aniso_rotate_prob, [N])
            s = w.mul(self.aniso_std).exp2()
            G_inv = G_inv @ rotate2d_inv(r) @ scale2d_inv(s, 1 / s) @ rotate2d_inv(-r)
            labels += [w * r.cos(), w * r.sin()]
        if self.translate_frac > 0:
            w = _gate(torch.randn([2, N], device=device), self.translate_frac * self.p, [1, N])
            G_inv = G_inv @ translate2d_inv(w[0].mul(W * self.translate_frac_std),
                                            w[1].mul(H * self.translate_frac_std))
            labels += [w[0], w[1]]
        return G_inv

    def _geometric_resample(self, images, G_inv):
        """Apply G_inv to every image: reflect pad, 2x upsample, bilinear resample, 2x downsample, crop."""
        N, C, H, W = images.shape
        device = images.device
        Hz_pad = len(self.Hz_geom) // 4

        # Padding: enough reflected border that no output pixel (plus filter support) samples outside.
        cx = (W - 1) / 2
        cy = (H - 1) / 2
        corners = _matrix([-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1], device=device)  # [4, xyz]
        corners = G_inv @ corners.t()  # [N, xyz, 4]
        margin = corners[:, :2, :].permute(1, 0, 2).flatten(1)  # [xy, N * 4]
        margin = torch.cat([-margin, margin]).max(dim=1).values  # [x0, y0, x1, y1]
        margin = margin + _constant([Hz_pad * 2 - cx, Hz_pad * 2 - cy] * 2, device=device)
        margin = margin.max(_constant([0, 0] * 2, device=device))
        margin = margin.min(_constant([W - 1, H - 1] * 2, device=device))
        mx0, my0, mx1, my1 = margin.ceil().to(torch.int32).tolist()
        images = torch.nn.functional.pad(input=images, pad=[mx0, mx1, my0, my1], mode='reflect')
        G_inv = translate2d((mx0 - mx1) / 2, (my0 - my1) / 2, device=device) @ G_inv

        # 2x upsampling; pixel centres move from k to 2k + 0.5.
        images = _upsample2x(images, self.Hz_geom)
        G_inv = scale2d(2, 2, device=device) @ G_inv @ scale2d_inv(2, 2, device=device)
        G_inv = translate2d(-0.5, -0.5, device=device) @ G_inv @ translate2d_inv(-0.5, -0.5, device=device)

        # Resample into the (2x, Hz_pad-bordered) output grid, in affine_grid's normalised coordinates.
        shape = [N, C, (H + Hz_pad * 2) * 2, (W + Hz_pad * 2) * 2]
        G_inv = scale2d(2 / images.shape[3], 2 / images.shape[2], device=device) @ G_inv @ \
            scale2d_inv(2 / shape[3], 2 / shape[2], device=device)
        grid = torch.nn.functional.affine_grid(theta=G_inv[:, :2, :].to(images.dtype), size=shape,
                                               align_corners=False)
        images = torch.nn.functional.grid_sample(images, grid, mode='bilinear', padding_mode='zeros',
                                                 align_corners=False)

        # 2x downsampling back to [N, C, H, W].
        return _downsample2x_crop(images, self.Hz_geom, Hz_pad)

    def _colour_matrix(self, images, labels):
        """float32 [N, 4, 4] colour matrix acting on (r, g, b, 1), or None if no colour option is on."""
        N = images.shape[0]
        device = images.device
        if not (self.brightness > 0 or self.contrast > 0 or self.lumaflip > 0 or self.hue > 0
                or self.saturation > 0):
            return None
        I_4 = torch.eye(4, device=device)
        M = I_4
        luma_axis = _constant(np.asarray([1, 1, 1, 0]) / np.sqrt(3), device=device)
        luma_outer = torch.outer(luma_axis, luma_axis)
        if self.brightness > 0:
            w = _gate(torch.randn([N], device=device), self.brightness * self.p, [N])
            b = w * self.brightness_std
            M = translate3d(b, b, b) @ M
            labels.append(w)
        if self.contrast > 0:
            w = _gate(torch.randn([N], device=device), self.contrast * self.p, [N])
            c = w.mul(self.contrast_std).exp2()
            M = scale3d(c, c, c) @ M
            labels.append(w)
        if self.lumaflip > 0:
            w = _gate(torch.randint(2, [N, 1, 1], device=device), self.lumaflip * self.p, [N, 1, 1])
            M = (I_4 - 2 * luma_outer * w) @ M  # reflect through the plane orthogonal to the luma axis
            labels.append(w)
        if self.hue > 0:
            w = (torch.rand([N], device=device) * 2 - 1) * (np.pi * self.hue_max)
            w = _gate(w, self.hue * self.p, [N])
            M = rotate3d(luma_axis, w) @ M
            labels += [w.cos() - 1, w.sin()]
        if self.saturation > 0:
            w = _gate(torch.randn([N, 1, 1], device=device), self.saturation * self.p, [N, 1, 1])
            M = (luma_outer + (I_4 - luma_outer) * w.mul(self.saturation_std).exp2()) @ M
            labels.append(w)
        return M

    def _colour_transform(self, images, M):
        N, C, H, W = images.shape
        M = M.to(images.dtype)
        images = images.reshape([N, C, H * W])
        if C == 3:
            images = M[:, :3, :3] @ images + M[:, :3, 3:]
        elif C == 1:
            M = M[:, :3, :].mean(dim=1, keepdim=True)  # grayscale: the average of the RGB rows
            images = images * M[:, :, :3].sum(dim=2, keepdim=True) + M[:, :, 3:]
        else:
            raise ValueError(f'AugmentPipe colour options need 1 or 3 channels, got {C}; disable brightness, '
                             f'contrast, lumaflip, hue and saturation for these images')
        return images.reshape([N, C, H, W])
