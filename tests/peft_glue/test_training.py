"""Training at scale: DDP (gloo, 2 CPU processes), transformers Trainer unchanged, bf16 autocast."""
import faulthandler
import os
import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


from models import labelled_batches, trainable_lsr_bert


_model = trainable_lsr_bert


def _batch():
    return labelled_batches(1)[0]


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _ddp_worker(rank, world, port, out):
    faulthandler.dump_traceback_later(240, exit=True)  # a hang prints every thread's stack, then fails the test
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    model = torch.nn.parallel.DistributedDataParallel(_model())
    ids, labels = _batch()
    half = slice(rank * 4, rank * 4 + 4)
    model(input_ids=ids[half], labels=labels[half]).loss.backward()
    if rank == 0:
        torch.save(_grads(model.module), out)
    # DDP's reducer must go before its process group: destroying it afterwards hung here (about 1 run in 6)
    del model
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_two_processes_match_one_process_on_the_whole_batch(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "ddp_grads.pt"
    # spawn, not fork: forking a process whose OpenMP pool is running can deadlock the child (seen here)
    ctx = mp.start_processes(_ddp_worker, args=(2, port, str(out)), nprocs=2, join=False, start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("DDP workers did not finish within 300 s")
    ddp = torch.load(out)
    model = _model()
    ids, labels = _batch()
    model(input_ids=ids, labels=labels).loss.backward()
    single = _grads(model)
    assert ddp.keys() == single.keys() and any("lsr_A1" in k for k in single)
    for k in single:
        # each gradient against a tolerance of its own size (the query factors' are ~1e-7 here: an absolute
        # 1e-6 would pass one DDP lost)
        scale = single[k].abs().max().item()
        assert scale > 1e-12, k
        torch.testing.assert_close(ddp[k], single[k], atol=1e-4 * scale, rtol=1e-4, msg=k)


def test_transformers_trainer_runs_unchanged(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = _model()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    ids, labels = _batch()
    data = [{"input_ids": ids[i], "attention_mask": torch.ones_like(ids[i]), "labels": labels[i]}
            for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4,
                             learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    result = Trainer(model=model, args=args, train_dataset=data).train()
    assert torch.isfinite(torch.tensor(result.training_loss))
    changed = [n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
    assert any("lsr_B2" in n for n in changed) and any("classifier" in n for n in changed)


def test_bf16_autocast_forward_backward():
    model = _model()
    ids, labels = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(input_ids=ids, labels=labels)
    out.loss.backward()
    ref = _model()
    ref_loss = ref(input_ids=ids, labels=labels).loss
    assert abs(out.loss.item() - ref_loss.item()) < 0.05
    for n, p in model.named_parameters():
        if "lsr_" in n:
            assert p.dtype == torch.float32 and p.grad is not None and torch.isfinite(p.grad).all(), n
