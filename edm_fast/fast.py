"""The fast path: any preconditioned network run channels-last in fp16/bf16, torch.compile'd, CUDA-graphed.

`FastDenoiser(net, ...)` is a drop-in denoiser for the samplers (edm_fast.generate.generate_images(denoiser=...)):
it keeps a private inference copy of the network (the caller's module and its fp32 state dict are untouched),
selects the compute dtype at run time (parameters stay fp32 and are cast at use, as NVlabs does), converts to
channels-last, precomputes EDM2's normalised weights, compiles with `fullgraph=True`, and on CUDA captures one
CUDA graph per batch shape.
`prepare_training(net, ...)` applies the same settings to a network that is being trained and returns the
callable the loss should use.
"""

import copy

import torch

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16,
          torch.float32: torch.float32, torch.float16: torch.float16, torch.bfloat16: torch.bfloat16}


def resolve_dtype(dtype):
    if dtype not in DTYPES:
        raise ValueError(f'dtype must be one of fp32, fp16, bf16 (or the torch dtypes), got {dtype!r}')
    return DTYPES[dtype]


def compile_network(net, fullgraph=True, dynamic=False, mode=None):
    """torch.compile of the module's forward (the module object, its parameters and names stay the same)."""
    return torch.compile(net, fullgraph=fullgraph, dynamic=dynamic, mode=mode)


class FastDenoiser:
    """D(x; sigma, class_labels) with the network's sigma range and round_sigma, as the samplers expect.

    dtype: compute dtype of the U-Net body (fp16/bf16/fp32); channels_last: memory format of activations and
    conv weights; compile: torch.compile(fullgraph=True); cuda_graphs: capture one graph per (batch, labels)
    shape on CUDA and replay it (results equal the uncaptured compiled call exactly).
    """

    def __init__(self, net, dtype=torch.float16, channels_last=True, compile=True, cuda_graphs=True, warmup=2):
        self.net = copy.deepcopy(net).eval().requires_grad_(False)
        self.dtype = resolve_dtype(dtype)
        self.net.set_compute_dtype(self.dtype)
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.fn = compile_network(self.net) if compile else self.net
        self.cuda_graphs = cuda_graphs
        self.warmup = warmup
        self.graphs = {}
        self.frozen = False
        for name in ('sigma_min', 'sigma_max', 'round_sigma', 'img_channels', 'img_resolution', 'label_dim'):
            if hasattr(net, name):  # EDM2 networks have no sigma range or round_sigma
                setattr(self, name, getattr(net, name))

    def _call(self, x, sigma, class_labels):
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.fn(x, sigma, class_labels)

    def _freeze(self, x, sigma, class_labels):
        """EDM2 nets: precompute the normalised MPConv weights once (networks_edm2.freeze_weights), so the
        compiled forward does not renormalise every weight per call."""
        self.frozen = True
        from .networks_edm2 import MPConv, freeze_weights
        if any(isinstance(m, MPConv) for m in self.net.modules()):
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            freeze_weights(self.net, x, sigma, class_labels)

    @torch.no_grad()
    def __call__(self, x, sigma, class_labels=None):
        sigma = torch.as_tensor(sigma, dtype=torch.float64, device=x.device)
        if not self.frozen:
            self._freeze(x, sigma, class_labels)
        if not (self.cuda_graphs and x.is_cuda):
            return self._call(x, sigma, class_labels)
        key = (tuple(x.shape), x.dtype, tuple(sigma.shape), None if class_labels is None else tuple(class_labels.shape))
        if key not in self.graphs:
            self.graphs[key] = self._capture(x, sigma, class_labels)
        graph, static_x, static_sigma, static_labels, static_out = self.graphs[key]
        static_x.copy_(x)
        static_sigma.copy_(sigma)
        if static_labels is not None:
            static_labels.copy_(class_labels)
        graph.replay()
        return static_out.clone()

    def _capture(self, x, sigma, class_labels):
        static_x, static_sigma = x.clone(), sigma.clone()
        static_labels = None if class_labels is None else class_labels.clone()
        stream = torch.cuda.Stream(device=x.device)
        stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(stream):  # warm-up (compilation, cuDNN autotuning) outside the capture
            for _ in range(self.warmup):
                self._call(static_x, static_sigma, static_labels)
        torch.cuda.current_stream(x.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = self._call(static_x, static_sigma, static_labels)
        return graph, static_x, static_sigma, static_labels, static_out


def prepare_training(net, dtype=None, channels_last=False, compile=False):
    """Set the compute dtype / memory format of a network being trained; return the callable for the loss."""
    if dtype is not None:
        net.set_compute_dtype(resolve_dtype(dtype))
    if channels_last:
        net.to(memory_format=torch.channels_last)
    return compile_network(net) if compile else net
