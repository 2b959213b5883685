"""The two-process training steps of tests/test_distributed.py, run as a script by a launcher:

    torchrun --standalone --nproc_per_node 2 helpers/distributed.py {ddp,fsdp,mismatch} OUT
    accelerate launch --cpu --num_processes 2 helpers/distributed.py accelerate OUT

Each process takes one step of prefix tuning through fastprefix (`from_peft` and a `TrainablePrefix`) on its
half of the batch, on gloo; rank 0 writes the prefix gradients after the all-reduce (FSDP: the full tensors of
the sharded gradients) to OUT. "mismatch" gives rank 1 a longer prefix than rank 0, which DDP must refuse."""

import os
import sys

import torch
from peft import PrefixTuningConfig, get_peft_model
from torch import nn

import fastprefix

ROWS, WIDTH, P = 4, 8, 3


def batch():
    """The whole batch: equal-length rows, so each rank's mean loss averages the same number of tokens."""
    ids = torch.randint(1, 128, (ROWS, WIDTH), generator=torch.Generator().manual_seed(7))
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids)


def rows(inputs, rank, world):
    return {key: value[rank * ROWS // world:(rank + 1) * ROWS // world] for key, value in inputs.items()}


class PrefixLM(nn.Module):
    """A frozen model with a TrainablePrefix: forward(**inputs) -> the LM loss, through fastprefix."""

    def __init__(self, model, trainable):
        super().__init__()
        self.model, self.trainable = model, trainable

    def forward(self, **inputs):
        with self.trainable.patched(self.model):
            return self.model(**inputs).loss


def models(length=P):
    """{"from_peft": module -> loss, "trainable": module -> loss}, identical in every process (seeded)."""
    from helpers.llama import tiny_model

    torch.manual_seed(0)
    peft_model = fastprefix.from_peft(get_peft_model(tiny_model(), PrefixTuningConfig(task_type="CAUSAL_LM",
                                                                                     num_virtual_tokens=length)))
    torch.manual_seed(1)
    model = tiny_model().requires_grad_(False)
    return {"from_peft": peft_model, "trainable": PrefixLM(model, fastprefix.TrainablePrefix(model, length=length))}


def loss_of(module, inputs):
    out = module(**inputs)
    return out if isinstance(out, torch.Tensor) else out.loss


def gradients(module) -> dict[str, torch.Tensor]:
    def full(grad):
        return grad.full_tensor() if hasattr(grad, "full_tensor") else grad
    return {name: full(p.grad).detach().clone() for name, p in module.named_parameters() if p.requires_grad}


def single_process_gradients() -> dict[str, dict[str, torch.Tensor]]:
    """What the two processes must agree with: one process, the whole batch."""
    found = {}
    for name, module in models().items():
        loss_of(module, batch()).backward()
        found[name] = gradients(module)
    return found


def fully_sharded(module):
    """FSDP2: each decoder layer and the root sharded over the ranks (the prefix parameters live in the root)."""
    from torch.distributed.fsdp import fully_shard

    base = module.get_base_model() if hasattr(module, "get_base_model") else module.model
    for layer in base.model.layers:
        fully_shard(layer)
    return fully_shard(module)


def torchrun_main(mode, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        found = {}
        for name, module in models(P + rank if mode == "mismatch" else P).items():
            wrapped = fully_sharded(module) if mode == "fsdp" else DistributedDataParallel(module)
            loss_of(wrapped, rows(batch(), rank, world)).backward()
            found[name] = gradients(module)
        if rank == 0:
            torch.save(found, out)
        # No rank tears its process group down while another still runs collectives: without this barrier,
        # destroy_process_group deadlocked in gloo's teardown in about half of the runs (torch 2.13).
        dist.barrier()
    finally:
        dist.destroy_process_group()


def accelerate_main(out):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)
    found = {}
    for name, module in models().items():
        prepared = accelerator.prepare(module)
        accelerator.backward(loss_of(prepared, rows(batch(), accelerator.process_index, accelerator.num_processes)))
        found[name] = gradients(module)
    if accelerator.is_main_process:
        torch.save(found, out)
    accelerator.wait_for_everyone()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    mode, out = sys.argv[1:]
    accelerate_main(out) if mode == "accelerate" else torchrun_main(mode, out)
