"""torch.distributed set-up for scripts run directly or under torchrun (nccl on GPUs, gloo on CPU)."""

import os

import torch


def init_from_env(device_type):
    """Initialise the default process group when launched by torchrun (WORLD_SIZE > 1).

    Returns (rank, world_size, device). On CUDA each process uses cuda:LOCAL_RANK.
    """
    world = int(os.environ.get('WORLD_SIZE', '1'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    device = torch.device(device_type)
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank if device.index is None else device.index)
        torch.cuda.set_device(device)
    if world > 1 and not torch.distributed.is_initialized():
        backend = 'nccl' if device.type == 'cuda' else 'gloo'
        torch.distributed.init_process_group(backend=backend, init_method='env://')
    if torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size(), device
    return 0, 1, device


def shutdown():
    """Destroy the process group (exiting with it alive can abort at interpreter exit)."""
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def gather_to_rank0(obj):
    """List of every rank's `obj` on rank 0 (None elsewhere); [obj] without torch.distributed."""
    if not torch.distributed.is_initialized():
        return [obj]
    world = torch.distributed.get_world_size()
    out = [None] * world if torch.distributed.get_rank() == 0 else None
    torch.distributed.gather_object(obj, out, dst=0)
    return out


def broadcast_from_rank0(obj):
    """Rank 0's `obj` on every rank (a picklable value); `obj` itself without torch.distributed."""
    if not torch.distributed.is_initialized():
        return obj
    box = [obj]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
