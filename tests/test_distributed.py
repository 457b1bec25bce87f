"""Data-parallel training: sharding, seeds, the torchrun relaunch, and a real 2-process (gloo) run."""
from __future__ import annotations

import json

import pytest
import torch

from catdog import distributed
from catdog.distributed import Ranks, ranks_from_env, shard
from catdog.model import load_checkpoint
from conftest import run_cli


@pytest.mark.parametrize("n,world", [(44, 2), (45, 2), (10, 3), (7, 4), (5, 1)])
def test_shards_cover_every_sample_once_and_take_equal_steps(n, world):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(n))
    shards = [shard(perm, r, world) for r in range(world)]
    assert len({len(order) for order, _ in shards}) == 1, "every rank must take the same number of steps"
    assert len(shards[0][0]) == -(-n // world)
    real = torch.cat([order[keep] for order, keep in shards])
    assert sorted(real.tolist()) == list(range(n)), "the real entries are a partition of the samples"
    padded = sum(int((~keep).sum()) for _, keep in shards)
    assert padded == -(-n // world) * world - n
    assert torch.equal(shards[0][0][shards[0][1]], perm[0::world]), "rank 0 takes perm[0::world]"


def test_ranks_from_torchrun_environment():
    assert ranks_from_env({}) == Ranks(0, 1, 0, 1) and not ranks_from_env({}).active
    r = ranks_from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"})
    assert (r.rank, r.world, r.local_rank, r.local_world, r.main, r.active) == (3, 4, 1, 2, False, True)
    assert distributed.threads_per_rank(0, r) >= 1 and distributed.threads_per_rank(3, r) == 3


def test_rank_seeds_keep_one_process_unchanged_and_differ_per_rank():
    assert distributed.rank_seed(7, 3, 0) == 7 * 1_000_003 + 3  # what a single process has always used
    seeds = {distributed.rank_seed(7, e, r) for e in range(1, 6) for r in range(4)}
    assert len(seeds) == 20
    assert distributed.rank_seed(7, 3, 1) == distributed.rank_seed(7, 3, 1)


def test_the_global_batch_must_split_evenly():
    distributed.check_batch(64, 4)
    with pytest.raises(ValueError, match="divisible by the 3 processes"):
        distributed.check_batch(64, 3)


@pytest.mark.parametrize("argv", [
    ["train", "D", "--nproc", "2", "--epochs", "1"],
    ["train", "D", "--nproc=2", "--epochs", "1"],
    ["train", "D", "--np", "2", "--epochs", "1"],
    ["train", "D", "--epochs", "1", "--nproc", "2"],
])
def test_the_relaunch_drops_nproc_and_keeps_the_rest(argv):
    cmd = distributed.torchrun_command(2, argv)
    assert cmd[cmd.index("--nproc-per-node") + 1] == "2" and "--standalone" in cmd
    assert cmd[cmd.index("-m", 3) + 1:] == ["catdog", "train", "D", "--epochs", "1"]


def _train2(data, run, epochs: int, *extra: str):
    return run_cli("train", str(data), "--out", str(run), "--model", "seed", "--epochs", str(epochs),
                   "--image-size", "32", "--batch-size", "8", "--threads", "1", "--nproc", "2", "--no-progress",
                   *extra, timeout=600)


@pytest.mark.slow
def test_two_processes_train_one_epoch(tiny_data, tmp_path):
    run = tmp_path / "a"
    proc = _train2(tiny_data, run, 1)
    assert proc.stdout.strip().endswith(str(run))
    assert "distributed: 2 processes (gloo), global batch 8 = 4 per process" in proc.stderr
    assert proc.stderr.count("epoch 1/1") == 1, "only rank 0 logs"
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "data.json", "history.csv", "best.pt", "last.pt", "results.json"} <= names
    assert not [n for n in names if n.endswith(".tmp")]

    # every training image was seen exactly once in the epoch, in steps of the global batch
    n_train = sum(json.loads((run / "data.json").read_text())["train"].values())
    last = torch.load(run / "last.pt", weights_only=False)
    assert last["world_size"] == 2 and last["global_batch"] == 8
    assert last["samples_per_epoch"] == n_train
    assert last["steps_per_epoch"] == -(-(-(-n_train // 2)) // 4)

    # the checkpoint loads and evaluates
    model, meta = load_checkpoint(run)
    assert meta["classes"] == ["cats", "dogs"]
    result = json.loads(run_cli("evaluate", str(run), "--json").stdout)
    assert result["n"] == 16 and 0 <= result["accuracy"] <= 1

    # one more epoch by --resume ends where a 2-epoch run of the same seed and world size ends
    # (the seed recipe's learning rate is constant, so only the epoch count changes)
    cfg = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**cfg, "epochs": 2}))
    assert "resuming" in run_cli("train", "--resume", str(run), "--nproc", "2", "--no-progress", "--no-eval").stderr
    _train2(tiny_data, tmp_path / "b", 2, "--no-eval")
    a, b = (torch.load(r / "last.pt", weights_only=False) for r in (run, tmp_path / "b"))
    assert a["epoch"] == b["epoch"] == 2
    assert all(torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert a["history"][-1]["train_loss"] == b["history"][-1]["train_loss"]


def test_nproc_flags_are_checked_before_any_process_starts(tiny_data, tmp_path):
    proc = run_cli("train", str(tiny_data), "--out", str(tmp_path / "r"), "--batch-size", "9", "--nproc", "2",
                   check=False)
    assert proc.returncode == 2 and "catdog: error:" in proc.stderr and "divisible" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "r").exists()
