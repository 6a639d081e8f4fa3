"""Data parallel training core (training/distributed.py) on the toy model: 2 gloo processes equal one
process running both data streams; stream bookkeeping across world sizes; collective-safe skipping."""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch
import torch.multiprocessing as mp

from training_helpers import ring_data, single_thread, tiny_config, tiny_models  # noqa: F401 (autouse)
from comfyui_add.training.checkpoint import load_checkpoint, read_meta
from comfyui_add.training.config import ADDConfig
from comfyui_add.training.distributed import Dist, local_streams, resolve_streams, stream_seed
from comfyui_add.training.loop import Trainer

# Two ranks average their gradients in one all_reduce; one process accumulates the same two
# sub-batches with weights 1/2. The sums differ only in float rounding order; after Adam steps
# the tensors agree to this absolute tolerance (measured here: bit-identical, difference 0.0).
TOL = 1e-5


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(rank: int, world: int, port: int, runs: list, out_dir: str) -> None:
    """One rank: each (name, config, poisoned rank) in ``runs`` trains into out_dir/name, in one process group."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        for name, cfg_dict, poison_rank in runs:
            cfg = ADDConfig.from_dict(cfg_dict)
            data = ring_data
            if rank == poison_rank:  # this rank's first batch is NaN: every rank must skip that update
                def data(generator, batch_size, _seen=[]):
                    batch = ring_data(generator, batch_size)
                    if not _seen:
                        _seen.append(1)
                        batch["x0"] = batch["x0"] * float("nan")
                    return batch
            trainer = Trainer(tiny_models(cfg), cfg, data, dist=Dist(rank=rank, world_size=world), data_streams=world)
            out = os.path.join(out_dir, name)
            trainer.run(checkpoint_dir=out)
            torch.save({"nonfinite": trainer.nonfinite_total,
                        "params": [p.detach().clone() for p in trainer.student_params + trainer.disc_params]},
                       os.path.join(out, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


CFG = tiny_config(max_steps=4, batch_size=4)
NAN_CFG = tiny_config(max_steps=2, batch_size=4, ema_decay=None)


@pytest.fixture(scope="module")
def ddp_runs(tmp_path_factory):
    """Two gloo processes (spawned once): a clean run and one whose rank 1 sees a NaN batch first."""
    out = tmp_path_factory.mktemp("ddp")
    runs = [("clean", CFG.to_dict(), -1), ("nan", NAN_CFG.to_dict(), 1)]
    mp.start_processes(_rank_main, args=(2, _free_port(), runs, str(out)), nprocs=2, start_method="spawn", join=True)
    yield out
    shutil.rmtree(out)


def _state(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {f"s{i}": p.detach().clone() for i, p in enumerate(trainer.student_params)}
    out.update({f"d{i}": p.detach().clone() for i, p in enumerate(trainer.disc_params)})
    out.update({f"b{i}": b.detach().clone() for i, b in enumerate(trainer.models.discriminator.heads.buffers())})
    out.update({f"e{i}": s.clone() for i, s in enumerate(trainer.ema.shadow)})
    return out


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_two_gloo_ranks_equal_one_process_running_both_streams(ddp_runs):
    cfg, root = CFG, ddp_runs / "clean"
    assert read_meta(root)["data_streams"] == 2
    ranks = [torch.load(root / f"rank{r}.pt") for r in range(2)]
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):  # replicas stay identical
        assert torch.equal(p0, p1)

    from_ddp = Trainer(tiny_models(cfg), cfg, ring_data)
    load_checkpoint(from_ddp, root)
    one = Trainer(tiny_models(cfg), cfg, ring_data, data_streams=2)  # both streams, accumulated
    one.run()
    assert _max_diff(_state(from_ddp), _state(one)) < TOL
    # not vacuous: one stream of batch 4 is another run, and training moved the weights
    single = Trainer(tiny_models(cfg), cfg, ring_data)
    single.run()
    assert _max_diff(_state(single), _state(one)) > 100 * TOL
    init = _state(Trainer(tiny_models(cfg), cfg, ring_data))
    assert _max_diff(init, _state(one)) > 100 * TOL


def test_a_nan_on_one_rank_skips_the_update_on_every_rank(ddp_runs):
    ranks = [torch.load(ddp_runs / "nan" / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["nonfinite"] == ranks[1]["nonfinite"] == 1  # the healthy rank skipped it too (no hang)
    for p0, p1 in zip(ranks[0]["params"], ranks[1]["params"]):
        assert torch.equal(p0, p1) and bool(torch.isfinite(p0).all())


def test_two_stream_run_continues_exactly_on_one_process(tmp_path):
    cfg = tiny_config(max_steps=4)
    straight = Trainer(tiny_models(cfg), cfg, ring_data, data_streams=2)
    straight.run()
    first = Trainer(tiny_models(cfg), cfg.replace(max_steps=2), ring_data, data_streams=2)
    first.run(checkpoint_dir=str(tmp_path))
    resumed = Trainer(tiny_models(cfg), cfg, ring_data)
    load_checkpoint(resumed, tmp_path)
    count, note = resolve_streams(read_meta(tmp_path)["data_streams"], None, world_size=1)
    assert (count, note) == (2, "")
    resumed.set_data_streams(count)
    resumed.run()
    assert _max_diff(_state(straight), _state(resumed)) == 0.0


def test_stream_bookkeeping():
    assert local_streams(4, 1, 2) == [2, 3] and local_streams(2, 0, 1) == [0, 1]
    with pytest.raises(ValueError, match="data_streams 3 cannot be shared by 2 ranks"):
        local_streams(3, 0, 2)
    assert resolve_streams(None, None, 8) == (8, "")  # new run: one stream per rank
    assert resolve_streams(8, None, 4) == (8, "")  # 8 -> 4 ranks: two streams each, same global batch
    count, note = resolve_streams(1, None, 2)  # 1 -> 2 ranks: cannot split one stream
    assert count == 2 and "global batch is now batch_size x 2" in note
    count, note = resolve_streams(2, 4, 2)
    assert count == 4 and "changed from 2 to 4" in note
    with pytest.raises(ValueError, match="multiple of the number of ranks"):
        resolve_streams(None, 3, 2)
    seeds = {stream_seed(0, k, r) for k in range(50) for r in range(8)}
    assert len(seeds) == 400 and stream_seed(0, 1, 2) == stream_seed(0, 1, 2) != stream_seed(1, 1, 2)
