"""A checkpoint's rank_NNNNN.pt as a resume reads it: a damaged one is one CheckpointReadError naming the file,
never a MemoryError, a hang or a traceback from deep inside the resume."""
import copy

import pytest
import torch

from vitscale.data.order import Cut, Order, elastic_plans
from vitscale.data.pipeline import build_train_loader
from vitscale.data.resume import read_rank_state, saved_stream_states
from vitscale.errors import CheckpointReadError


def _rank_state(rank=0, world=1, workers=2) -> dict:
    loader = build_train_loader([f"/none/{i}.tar" for i in range(8)], batch_size=1, img_size=16, seed=0, rank=rank,
                                world_size=world, num_workers=workers)
    return {"rng": {"torch": torch.get_rng_state()}, "data": loader.state_dict(), "decode_failures": 0}


def _set(path, value):
    def edit(s):
        *head, last = path
        for k in head:
            s = s[k]
        s[last] = value
    return edit


DAMAGE = {  # what the review's resumes died of (MemoryError, IndexError, AttributeError, TypeError) and kin
    "world_huge": _set(["data", "world_size"], 10**11),
    "workers_huge": _set(["data", "num_workers"], 10**11),
    "item_negative": _set(["data", "workers", 0, "item"], -5),
    "epoch_float": _set(["data", "workers", 0, "epoch"], 1.5),
    "epochs_apart": _set(["data", "workers", 1, "epoch"], 10**12),
    "data_list": _set(["data"], [1, 2]),
    "workers_str": _set(["data", "workers"], "abc"),
    "k_zero": _set(["data", "k"], 0),
    "rng_floats": _set(["rng", "torch"], torch.zeros(3)),
    "rng_invalid": _set(["rng", "torch"], torch.zeros(5056, dtype=torch.uint8)),
    "decode_str": _set(["decode_failures"], "x"),
    "plans_str": _set(["data", "plans"], [[0, 1, "ab"]]),
    "rank_other": _set(["data", "rank"], 1),
}


@pytest.mark.parametrize("case", sorted(DAMAGE))
def test_a_damaged_rank_state_is_one_error_naming_its_file(tmp_path, case):
    state = _rank_state()
    DAMAGE[case](state)
    path = tmp_path / "rank_00000.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointReadError) as err:
        read_rank_state(path)
    line = str(err.value)
    assert str(path) in line and "\n" not in line and len(line) < 400


def test_a_top_level_list_is_refused_and_a_sound_state_is_read(tmp_path):
    torch.save([1, 2, 3], tmp_path / "rank_00000.pt")
    with pytest.raises(CheckpointReadError, match="rank_00000.pt: a list, not a dict"):
        read_rank_state(tmp_path / "rank_00000.pt")
    good = _rank_state()
    torch.save(good, tmp_path / "rank_00000.pt")
    assert read_rank_state(tmp_path / "rank_00000.pt")["data"] == good["data"]
    torch.save({"rng": {}}, tmp_path / "rank_00000.pt")  # holds nothing: as if absent
    assert read_rank_state(tmp_path / "rank_00000.pt") == {}


def test_every_ranks_states_are_checked_together_for_an_elastic_resume(tmp_path):
    states = [_rank_state(rank=r, world=2) for r in range(2)]
    for r, s in enumerate(states):
        torch.save(s, tmp_path / f"rank_{r:05d}.pt")
    assert [s["rank"] for s in saved_stream_states(tmp_path)] == [0, 1]
    far = copy.deepcopy(states[1])
    for w in far["data"]["workers"]:
        w["epoch"] = 10**12  # each file alone is sane; together they span 10^12 epochs
    torch.save(far, tmp_path / "rank_00001.pt")
    with pytest.raises(CheckpointReadError, match=f"{tmp_path}: readers at epochs 0 and 1000000000000"):
        saved_stream_states(tmp_path)
    (tmp_path / "rank_00001.pt").unlink()  # world_size 2, one rank file: not the checkpoint it claims to be
    with pytest.raises(CheckpointReadError, match="world_size is 2 but the checkpoint has 1 rank file"):
        saved_stream_states(tmp_path)


def test_elastic_plans_refuse_an_epoch_span_instead_of_looping_over_it():
    order = Order(seed=0, num_shards=2, shuffle=True, shards_in_flight=1, shuffle_buffer=0)
    positions = [{"epoch": 0, "item": 0, "offset": 0}, {"epoch": 10**12, "item": 0, "offset": 0}]
    with pytest.raises(ValueError, match="more than 10000 apart"):
        elastic_plans(order, Cut(1, 2), {}, positions)


class _NoEngine:
    def load(self, *args):  # the DeepSpeed shards are not what this test is about
        pass


@pytest.mark.parametrize("case", ["world_huge", "item_negative", "data_list", "rng_floats", "decode_str"])
def test_the_checkpoint_managers_load_checks_the_rank_state(tmp_path, case):
    from vitscale.distributed.checkpoint import CheckpointManager

    ckpt = tmp_path / "step_00000004"
    ckpt.mkdir()
    (ckpt / "trainer_state.json").write_text('{"step": 4, "world_size": 1}')
    state = _rank_state()
    DAMAGE[case](state)
    torch.save(state, ckpt / "rank_00000.pt")
    # before: loaded as found, to fail later as MemoryError, IndexError, AttributeError or TypeError
    with pytest.raises(CheckpointReadError, match="rank_00000.pt"):
        CheckpointManager(tmp_path, rank=0, read_rank=read_rank_state).load(_NoEngine(), ckpt)
    with pytest.raises(CheckpointReadError, match="rank_00000.pt"):  # a rank that did not exist then reads rank 0's
        CheckpointManager(tmp_path, rank=1, read_rank=read_rank_state).load(_NoEngine(), ckpt)
