"""Power-function EMA and post-hoc EMA reconstruction (EDM2, spec §10.6; NVlabs `training/phema.py` and
`reconstruct_phema.py`).

A power-function EMA with exponent gamma averages the training trajectory theta(tau), tau <= t, with weights
proportional to tau^gamma; its relative standard deviation ("EMA length") is
std(gamma) = sqrt((gamma + 1) / ((gamma + 2)^2 (gamma + 3))). gamma >= 0 gives 0 < std <= sqrt(1/12) = 0.28868
(MAX_STD); NVlabs accepts EMA lengths 0 < std < 0.289 (STD_LIMIT, the bound of its reconstruct_phema.py
std lists), the top sliver of which maps to slightly negative exponents (gamma > -0.007), still a proper
average.
Training tracks a few such averages (`PowerFunctionEMA`) and snapshots them; afterwards any other
(time, std) profile is approximated by a least-squares combination of the stored profiles
(`solve_posthoc_coefficients`) and the weights are combined accordingly (`reconstruct_phema`).

The float64 math functions mirror NVlabs numerically (checked against the edm2_phema vectors).
"""

import copy
import os
import re

import numpy as np
import torch

MAX_STD = 0.28867513459481287  # exp_to_std(0) = sqrt(1/12): the EMA length of a plain running average (gamma = 0)
STD_LIMIT = 0.289  # EMA lengths lie in (0, STD_LIMIT): NVlabs reconstruct_phema.py's bound on --instd/--outstd

# ----------------------------------------------------------------------------------------------------
# Power-function profiles (float64 numpy).


def exp_to_std(exp):
    """Relative standard deviation of a power-function EMA with exponent `exp` (array-like -> float64)."""
    exp = np.float64(exp)
    std = np.sqrt((exp + 1) / (exp + 2) ** 2 / (exp + 3))
    return std


def std_to_exp(std):
    """Exponent of the power-function EMA with relative std `std`: the largest real root of
    x^3 + 7x^2 + (16 - std^-2) x + (12 - std^-2) (array-like -> float64 of the same shape)."""
    std = np.float64(std)
    tmp = std.flatten() ** -2
    exp = [np.roots([1, 7, 16 - t, 12 - t]).real.max() for t in tmp]
    exp = np.float64(exp).reshape(std.shape)
    return exp


def power_function_response(ofs, std, len, axis=0):
    """Discrete weight profile of power-function EMAs over t = 0 .. len-1: for each (ofs, std) pair
    (broadcast), weights proportional to (t / ofs)^exp for t <= ofs and 0 after, normalised to sum 1 along
    `axis` (which indexes t in the result)."""
    ofs, std = np.broadcast_arrays(ofs, std)
    ofs = np.stack([np.float64(ofs)], axis=axis)
    exp = np.stack([std_to_exp(std)], axis=axis)
    s = [1] * exp.ndim
    s[axis] = -1
    t = np.arange(len).reshape(s)
    resp = np.where(t <= ofs, (t / ofs) ** exp, 0) / ofs * (exp + 1)
    resp = resp / np.sum(resp, axis=axis, keepdims=True)
    return resp


def power_function_correlation(a_ofs, a_std, b_ofs, b_std):
    """Inner product of two continuous power-function profiles (broadcast over the inputs):
    (ga+1)(gb+1) (ta/tb)^e / ((ga+gb+1) max(ta, tb)), e = gb if ta < tb else -ga."""
    a_exp = std_to_exp(a_std)
    b_exp = std_to_exp(b_std)
    t_ratio = a_ofs / b_ofs
    t_exp = np.where(a_ofs < b_ofs, b_exp, -a_exp)
    t_max = np.maximum(a_ofs, b_ofs)
    num = (a_exp + 1) * (b_exp + 1) * t_ratio ** t_exp
    den = (a_exp + b_exp + 1) * t_max
    return num / den


def power_function_beta(std, t_next, t_delta):
    """EMA decay for one step: beta = (1 - t_delta / t_next)^(exp + 1), t_next the image count after the step."""
    beta = (1 - t_delta / t_next) ** (std_to_exp(std) + 1)
    return beta


def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std):
    """Least-squares coefficients X [num_in, num_out] with sum_i X[i, k] profile(in_i) ~ profile(out_k):
    solve A X = B (A, B: power_function_correlation Gram matrices), then scale each column to sum 1."""
    in_ofs, in_std = np.broadcast_arrays(in_ofs, in_std)
    out_ofs, out_std = np.broadcast_arrays(out_ofs, out_std)
    rv = lambda x: np.float64(x).reshape(-1, 1)  # noqa: E731
    cv = lambda x: np.float64(x).reshape(1, -1)  # noqa: E731
    A = power_function_correlation(rv(in_ofs), rv(in_std), cv(in_ofs), cv(in_std))
    B = power_function_correlation(rv(in_ofs), rv(in_std), cv(out_ofs), cv(out_std))
    X = np.linalg.solve(A, B)
    X = X / np.sum(X, axis=0)
    return X


def check_std(std, what='std'):
    """Raise ValueError unless 0 < std < 0.289 (STD_LIMIT, the range NVlabs accepts); returns float(std)."""
    if not (isinstance(std, (int, float, np.floating)) and not isinstance(std, bool) and 0 < std < STD_LIMIT):
        raise ValueError(f'{what}={std!r} is not a valid EMA length: it must lie in (0, {STD_LIMIT}), e.g. 0.05')
    return float(std)


def parse_std_list(text):
    """Parse a comma-separated list of EMA lengths as NVlabs reconstruct_phema.py does for --outstd/--instd.

    A `...` item continues the arithmetic progression of the two numbers just before it up to the number
    just after it: '0.010,0.015,...,0.030' -> [0.010, 0.015, 0.020, 0.025, 0.030]. The inserted values are
    b + (b - a) * k for k = 1..n (a, b the numbers before `...`, c the one after), with
    n = round((c - b) / (b - a) - 1), which must be at least 1 and within 1e-4 of that ratio. They are not
    rounded: in '0.010,0.015,...,0.030' the 0.020 is 0.019999999999999997, the value NVlabs uses too.
    Several `...` items are allowed, each with its own two numbers before it; descending ranges work too.
    Blank items are ignored. The result is sorted, duplicates removed, and every value must lie in
    (0, 0.289). A list of numbers is checked and returned sorted the same way.
    Raises ValueError with a message saying what is wrong.
    """
    if isinstance(text, (list, tuple)):
        items = [float(v) for v in text]
    else:
        items = []
        for token in str(text).split(','):
            token = token.strip()
            if token == '...':
                items.append(None)
            elif token:
                try:
                    items.append(float(token))
                except ValueError:
                    raise ValueError(f'{token!r} is not a number: expected a comma-separated list of numbers, '
                                     f'e.g. 0.05,0.1, or a range such as 0.010,0.015,...,0.250') from None
    values = []
    for i, item in enumerate(items):
        if item is not None:
            values.append(item)
            continue
        if i < 2 or items[i - 2] is None or items[i - 1] is None:
            raise ValueError("'...' must come after two numbers (the first two terms of the range), e.g. "
                             "0.010,0.015,...,0.250")
        if i + 1 >= len(items) or items[i + 1] is None:
            raise ValueError("'...' must be followed by a number (the last term of the range), e.g. "
                             "0.010,0.015,...,0.250")
        a, b, c = items[i - 2], items[i - 1], items[i + 1]
        step = b - a
        if step == 0:
            raise ValueError(f"the two numbers before '...' are equal ({a}, {b}): they set the step of the range, "
                             f"e.g. 0.010,0.015,...,0.250")
        ratio = (c - b) / step - 1
        count = round(ratio)
        if count <= 0:
            raise ValueError(f"'...' between {b} and {c} with step {step:g} inserts no value; list the numbers "
                             f"directly or end the range further away")
        if abs(count - ratio) > 1e-4:
            raise ValueError(f"{a},{b},...,{c}: {c} is not reached from {b} in whole steps of {step:g}; make the "
                             f"last number {b} + k * {step:g}")
        values.extend(b + step * (k + 1) for k in range(count))
    if not values:
        raise ValueError('expected at least one number, e.g. 0.05,0.1')
    values = sorted(set(values))
    bad = [v for v in values if not 0 < v < STD_LIMIT]
    if bad:
        raise ValueError(f'{bad[0]!r} is not a valid EMA length: every value must lie in (0, {STD_LIMIT}), e.g. 0.05')
    return values

# ----------------------------------------------------------------------------------------------------
# EMA trackers used by the training loop.


class PowerFunctionEMA:
    """Power-function EMAs of `net`'s parameters for several relative stds (NVlabs semantics).

    update(cur_nimg, batch_size) after every optimizer step, with cur_nimg the image count *after* the
    step: beta = (1 - batch_size / cur_nimg)^(exp + 1) (0 on the first step, so EMA = net), then
    p_ema <- lerp(p_ema, p_net, 1 - beta) for parameters only. get() copies the net's buffers into every
    EMA and returns [(ema_net, '-0.050'), ...]. The EMA copies are in eval mode without gradients.
    """

    @torch.no_grad()
    def __init__(self, net, stds=[0.050, 0.100]):
        self.net = net
        self.stds = [check_std(s, 'PowerFunctionEMA std') for s in stds]
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _std in self.stds]

    @torch.no_grad()
    def reset(self):
        """Set every EMA to the net's current parameters."""
        for ema in self.emas:
            for p_net, p_ema in zip(self.net.parameters(), ema.parameters()):
                p_ema.copy_(p_net)

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        for std, ema in zip(self.stds, self.emas):
            beta = power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size)
            for p_net, p_ema in zip(self.net.parameters(), ema.parameters()):
                p_ema.lerp_(p_net, 1 - beta)

    @torch.no_grad()
    def get(self):
        for ema in self.emas:
            for b_net, b_ema in zip(self.net.buffers(), ema.buffers()):
                b_ema.copy_(b_net)
        return [(ema, f'-{std:.3f}') for std, ema in zip(self.stds, self.emas)]

    def state_dict(self):
        """dict(stds=[float], emas=[state_dict]): plain values and tensors (loadable with weights_only)."""
        return dict(stds=list(self.stds), emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state):
        stds = [float(s) for s in state['stds']]
        if stds != self.stds:
            raise ValueError(f'the saved EMA tracks stds {stds}, this run tracks {self.stds}; resume with the same '
                             f'EMA stds')
        for ema, s_ema in zip(self.emas, state['emas']):
            ema.load_state_dict(s_ema)


class TraditionalEMA:
    """EDM-style EMA with half-life halflife_Mimg (million images) and ramp-up ratio, for comparison runs.

    beta = 0.5^(batch_size / min(halflife, cur_nimg * rampup_ratio)); get() returns the EMA net.
    """

    @torch.no_grad()
    def __init__(self, net, halflife_Mimg=float('inf'), rampup_ratio=0.09):
        self.net = net
        self.halflife_Mimg = halflife_Mimg
        self.rampup_ratio = rampup_ratio
        self.ema = copy.deepcopy(net).eval().requires_grad_(False)

    @torch.no_grad()
    def reset(self):
        for p_net, p_ema in zip(self.net.parameters(), self.ema.parameters()):
            p_ema.copy_(p_net)

    @torch.no_grad()
    def update(self, cur_nimg, batch_size):
        halflife_nimg = self.halflife_Mimg * 1e6
        if self.rampup_ratio is not None:
            halflife_nimg = min(halflife_nimg, cur_nimg * self.rampup_ratio)
        beta = 0.5 ** (batch_size / max(halflife_nimg, 1e-8))
        for p_net, p_ema in zip(self.net.parameters(), self.ema.parameters()):
            p_ema.lerp_(p_net, 1 - beta)

    @torch.no_grad()
    def get(self):
        for b_net, b_ema in zip(self.net.buffers(), self.ema.buffers()):
            b_ema.copy_(b_net)
        return self.ema

    def state_dict(self):
        return self.ema.state_dict()

    def load_state_dict(self, state):
        self.ema.load_state_dict(state)


EMA_TYPES = {'PowerFunctionEMA': PowerFunctionEMA, 'TraditionalEMA': TraditionalEMA}

# ----------------------------------------------------------------------------------------------------
# Post-hoc reconstruction.


class PhemaError(ValueError):
    """A post-hoc reconstruction request that cannot be served; `param` names the offending argument."""

    def __init__(self, message, param=None):
        super().__init__(message)
        self.param = param


def kimg_to_nimg(kimg):
    """Image count of a snapshot named by kimg = nimg // 1000, for nimg a multiple of 1024 (NVlabs rule)."""
    return ((int(kimg) * 1000 + 999) // 1024) * 1024


_SNAPSHOT_NAME = re.compile(r'(.*)-(\d+)-(\d+\.\d+)\.(pkl|safetensors)')


def list_input_snapshots(in_dir, in_prefix=None, in_std=None):
    """Snapshots `{prefix}-{kimg}-{std}.pkl|.safetensors` in in_dir, sorted by (nimg, std).

    Returns a list of dict(path, nimg, std). nimg is exact for edm_fast snapshots that record it (extra
    cur_nimg), else kimg_to_nimg(kimg). Filters: in_prefix (e.g. 'network-snapshot') and in_std (a list, or a
    string for `parse_std_list`; compared to 3 decimals, where NVlabs compares floats exactly).
    """
    from . import checkpoint
    if not os.path.isdir(in_dir):
        what = 'is a file, not a directory' if os.path.exists(in_dir) else 'does not exist'
        raise PhemaError(f'input directory {in_dir!r} {what}', 'in_dir')
    if isinstance(in_std, str):
        try:
            in_std = parse_std_list(in_std)
        except ValueError as e:
            raise PhemaError(str(e), 'in_std') from None
    # Matched to 3 decimals (the file names' precision), so range items such as 0.049999999999999996 match.
    wanted = None if in_std is None else {round(float(s), 3) for s in in_std}
    found = []
    with os.scandir(in_dir) as it:
        for entry in it:
            m = _SNAPSHOT_NAME.fullmatch(entry.name)
            if not m or not entry.is_file():
                continue
            prefix, kimg, std = m.group(1), int(m.group(2)), float(m.group(3))
            if in_prefix is not None and prefix != in_prefix:
                continue
            if wanted is not None and round(std, 3) not in wanted:
                continue
            nimg = kimg_to_nimg(kimg)
            if m.group(4) == 'safetensors':
                extra = checkpoint.read_snapshot_extra(entry.path) or {}
                if isinstance(extra.get('cur_nimg'), int) and extra['cur_nimg'] // 1000 == kimg:
                    nimg = extra['cur_nimg']
                if isinstance(extra.get('ema_std'), (int, float)) and round(extra['ema_std'], 3) == round(std, 3):
                    std = float(extra['ema_std'])
            found.append(dict(path=entry.path, nimg=nimg, std=std))
    return sorted(found, key=lambda s: (s['nimg'], s['std']))


def _resolve_inputs(in_snapshots, in_prefix, in_std):
    if isinstance(in_snapshots, (str, os.PathLike)):
        return list_input_snapshots(os.fspath(in_snapshots), in_prefix, in_std)
    inputs = []
    for item in in_snapshots:
        if isinstance(item, dict):
            inputs.append(dict(path=os.fspath(item['path']), nimg=int(item['nimg']), std=float(item['std'])))
        else:
            raise PhemaError(f'inputs must be a directory or dicts with path, nimg and std; got {item!r}',
                             'in_snapshots')
    return sorted(inputs, key=lambda s: (s['nimg'], s['std']))


def _same_network(ref, net, path):
    if type(net) is not ref[0] or net.init_kwargs != ref[1] or \
            {k: tuple(v.shape) for k, v in net.state_dict().items()} != ref[2]:
        raise PhemaError(f'{path} holds a different network ({type(net).__name__}({net.init_kwargs})) than the '
                         f'first input ({ref[0].__name__}({ref[1]})); reconstruct from snapshots of one training run',
                         'in_snapshots')


@torch.no_grad()
def reconstruct_phema(in_snapshots, out_std, out_kimg=None, out_dir='.', out_prefix='phema', max_batch_size=8,
                      in_prefix=None, in_std=None, out_nimg=None, skip_existing=False, verbose=True):
    """Post-hoc EMA reconstruction: write `{out_prefix}-{kimg:07d}-{std:.3f}.safetensors` for every std in out_std.

    in_snapshots: a directory of `network-snapshot-{kimg}-{std}` files (edm_fast .safetensors or official
    EDM2 .pkl; filtered by in_prefix / in_std) or a list of dict(path, nimg, std). out_std: a float, a list
    in (0, 0.289), or a string for `parse_std_list` ('0.010,0.015,...,0.250'). Stds that give the same file
    name (equal to 3 decimals) are written once. out_kimg / out_nimg: the training time to reconstruct
    (default the newest input); only inputs with 0 < nimg <= out_nimg are used. NVlabs requires an input
    snapshot at exactly that time; here any time within the inputs' range works. skip_existing: leave out
    stds whose output file already exists (NVlabs --skip; files are written atomically, so an existing one
    is complete); when nothing is left no input is read. Up to max_batch_size outputs are built per pass
    over the inputs, so with len(out_std) <= max_batch_size every input is read exactly once; memory holds
    one input network plus the fp32 accumulators of the outputs. Parameters are sum_i X[i, k] theta_i
    (fp32), buffers come from the newest input, the result is stored in fp16, parameters and buffers (as NVlabs).
    Returns a list of dict(path, std, nimg, coefs), one per file written.
    """
    from . import checkpoint
    inputs = _resolve_inputs(in_snapshots, in_prefix, in_std)
    if not inputs and in_std is not None and isinstance(in_snapshots, (str, os.PathLike)):
        present = sorted({f'{s["std"]:.3f}' for s in _resolve_inputs(in_snapshots, in_prefix, None)})
        if present:
            raise PhemaError(f'none of the snapshots in {in_snapshots!r} has an EMA length in --instd (they have '
                             f'{", ".join(present)})', 'in_std')
    if not inputs:
        raise PhemaError(f'no input snapshots found in {in_snapshots!r} (expected files named '
                         f'<prefix>-<kimg>-<std>.safetensors or .pkl)', 'in_dir')
    if isinstance(out_std, str):
        try:
            out_std = parse_std_list(out_std)
        except ValueError as e:
            raise PhemaError(str(e), 'out_std') from None
    out_stds = [out_std] if isinstance(out_std, (int, float, np.floating)) else list(out_std)
    if not out_stds:
        raise PhemaError('no output std given', 'out_std')
    by_name = {}
    for std in sorted({check_std_param(s) for s in out_stds}):
        by_name.setdefault(f'{std:.3f}', std)  # one output per file name (e.g. 0.02 and 0.020000000000000004)
    out_stds = list(by_name.values())
    if max_batch_size < 1:
        raise PhemaError(f'max_batch_size must be at least 1, got {max_batch_size}', 'max_batch_size')

    if out_nimg is not None and out_kimg is not None:
        raise PhemaError('give out_kimg or out_nimg, not both', 'out_kimg')
    if out_kimg is not None:
        if int(out_kimg) != out_kimg or out_kimg < 1:
            raise PhemaError(f'out_kimg must be a positive integer, got {out_kimg!r}', 'out_kimg')
        exact = [s['nimg'] for s in inputs if s['nimg'] // 1000 == out_kimg]
        out_nimg = exact[0] if exact else kimg_to_nimg(out_kimg)
        if out_nimg // 1000 != out_kimg:
            raise PhemaError(f'no multiple of 1024 images falls in {out_kimg} kimg, so no snapshot can have that '
                             f'name; give the kimg of one of the input snapshots', 'out_kimg')
    if out_nimg is None:
        out_nimg = max(s['nimg'] for s in inputs)
    newest = max(s['nimg'] for s in inputs)
    if not 0 < out_nimg <= newest:
        raise PhemaError(f'cannot reconstruct at {out_nimg // 1000} kimg: the input snapshots cover '
                         f'{min(s["nimg"] for s in inputs) // 1000}..{newest // 1000} kimg; choose a time within '
                         f'that range', 'out_kimg')
    inputs = [s for s in inputs if 0 < s['nimg'] <= out_nimg]
    if not inputs:
        raise PhemaError(f'no input snapshot lies in (0, {out_nimg // 1000}] kimg', 'out_kimg')
    seen = {}
    for s in inputs:
        key = (s['nimg'], round(s['std'], 6))
        if key in seen:
            raise PhemaError(f'{s["path"]} and {seen[key]} have the same time and std; keep one of them',
                             'in_snapshots')
        seen[key] = s['path']
    in_nimg = np.float64([s['nimg'] for s in inputs])
    in_stds = np.float64([check_std(s['std'], f'input {s["path"]} std') for s in inputs])

    def out_path(std):
        return os.path.join(out_dir if out_dir is not None else '.',
                            f'{out_prefix}-{out_nimg // 1000:07d}-{std:.3f}.safetensors')

    if skip_existing:
        existing = [std for std in out_stds if os.path.isfile(out_path(std))]
        if verbose:
            for std in existing:
                print(f'Skipping {out_path(std)}: it exists')
        out_stds = [std for std in out_stds if std not in existing]
        if not out_stds:
            if verbose:
                print('Nothing to reconstruct: every output file exists')
            return []
    if verbose:
        print(f'Reconstructing {len(out_stds)} EMA profile(s) at {out_nimg} images from {len(inputs)} snapshots')

    if out_dir is not None:
        os.makedirs(out_dir, exist_ok=True)
    results = []
    num_batches = (len(out_stds) - 1) // max_batch_size + 1
    for batch in np.array_split(np.float64(out_stds), num_batches):
        coefs = solve_posthoc_coefficients(in_nimg, in_stds, out_nimg, batch)
        if not np.all(np.isfinite(coefs)):
            raise PhemaError('the post-hoc least-squares system is singular for these inputs; use snapshots at '
                             'more distinct times or stds', 'in_snapshots')
        acc = None
        ref = net = data = None
        for i, snap in enumerate(inputs):
            if verbose:
                print(f'  [{i + 1}/{len(inputs)}] {snap["path"]}', flush=True)
            data = checkpoint.load_snapshot(snap['path'])
            net = data['ema']
            if ref is None:
                ref = (type(net), net.init_kwargs, {k: tuple(v.shape) for k, v in net.state_dict().items()})
                acc = [{name: torch.zeros_like(p, dtype=torch.float32) for name, p in net.named_parameters()}
                       for _ in batch]
            else:
                _same_network(ref, net, snap['path'])
            params = dict(net.named_parameters())
            for j in range(len(batch)):
                for name, total in acc[j].items():
                    total.add_(params[name].to(torch.float32) * float(coefs[i, j]))
            if i < len(inputs) - 1:
                del net, data, params
        # The newest input (kept) provides the buffers and the skeleton the outputs are written from.
        for j, std in enumerate(batch):
            for name, p in net.named_parameters():
                p.copy_(acc[j][name])
            path = out_path(std)
            extra = dict(kimg=out_nimg / 1000, cur_nimg=int(out_nimg), ema_std=float(std),
                         phema_inputs=[dict(file=os.path.basename(s['path']), nimg=int(s['nimg']), std=float(s['std']),
                                            coef=float(coefs[i, j])) for i, s in enumerate(inputs)])
            checkpoint.save_snapshot(path, net, loss_fn=data['loss_fn'], dataset_kwargs=data['dataset_kwargs'],
                                     encoder=data.get('encoder'), extra=extra, dtype=torch.float16)
            if verbose:
                print(f'  -> {path}')
            results.append(dict(path=path, std=float(std), nimg=int(out_nimg), coefs=coefs[:, j].copy()))
        del acc, net, data
    return results


def check_std_param(std):
    try:
        return check_std(float(std), 'out_std')
    except (TypeError, ValueError) as e:
        raise PhemaError(str(e), 'out_std') from None
