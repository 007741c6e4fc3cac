"""Fuzzing the small readers of a user's files: labels (cls, txt, json:FIELD), shard manifests and url lists,
``pipe:`` specs, config YAML and overrides, and a checkpoint's COMPLETE marker and trainer_state.json.

Property: every input is read or refused with one line of the type the caller turns into a clean exit (a
``VitscaleError``, or ``ValueError``/``FileNotFoundError`` which the CLI prints as one line; a label's
``ValueError`` is the loader's counted skip); nothing else escapes and nothing runs past a time bound.
"""
import json
import string

import pytest
import yaml
from fuzz_bounds import one_line, time_limit
from hypothesis import example, given
from hypothesis import strategies as st

from vitscale.config.load import load_config, parse_overrides
from vitscale.data.shards import load_manifest, resolve_shards
from vitscale.data.tario import ShardError, iter_shard, label_ext, sample_label
from vitscale.distributed.checkpoint import is_complete, read_trainer_state
from vitscale.errors import ConfigError, VitscaleError

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=10),
                           lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                       max_size=4), max_leaves=12)


def _refused_or_read(fn, *args, allowed=(ValueError, FileNotFoundError, VitscaleError)):
    with time_limit(20, fn.__name__):  # generous: the CI machine is shared
        try:
            return fn(*args)
        except allowed as e:
            one_line(str(e))
            return e


# ----- labels ---------------------------------------------------------------------------------------------------
@given(st.sampled_from(["cls", "txt", "json:label", "json:a.b"]), st.one_of(
    st.binary(max_size=60), st.builds(lambda v: json.dumps(v).encode(), json_values),
    st.builds(lambda n: b"[" * n + b"]" * n, st.integers(0, 100_000)),
    st.builds(lambda n: b"9" * n, st.integers(1, 10_000))))
@example("json:label", b'{"label": 1e999}')
@example("json:label", b'{"label": NaN}')
def test_labels_are_an_integer_none_or_one_value_error(key, raw):
    got = _refused_or_read(sample_label, {key.split(":")[0]: raw}, key, allowed=(ValueError,))
    assert got is None or isinstance(got, ValueError) or (type(got) is int and -(1 << 63) <= got < (1 << 63))


@given(st.text(max_size=20))
def test_any_label_key_is_accepted_or_refused_in_one_line(key):
    _refused_or_read(label_ext, key, allowed=(ValueError,))


# ----- manifests, url lists, specs --------------------------------------------------------------------------------
@given(json_values | st.fixed_dictionaries({"shards": json_values}, optional={
    "num_samples": json_values, "class_names": json_values, "labels": json_values, "num_classes": json_values}))
@example({"shards": [{"name": 3}]})
@example({"shards": [], "class_names": 5})
def test_any_manifest_is_read_or_refused(tmp_path_factory, manifest):
    path = tmp_path_factory.mktemp("m") / "manifest.json"
    path.write_text(json.dumps(manifest))
    got = _refused_or_read(load_manifest, path)
    if not isinstance(got, Exception):
        assert all(isinstance(u, str) for u in got.urls)
        assert got.class_names is None or all(isinstance(c, str) for c in got.class_names)
        assert got.num_samples is None or type(got.num_samples) is int


spec_text = st.text(alphabet=string.ascii_letters + string.digits + "{}.,/:-_ #*?~\n", max_size=40)


ends = st.integers(0, 3000) | st.integers(2 * 10 ** 6, 10 ** 12)  # a few urls, or a pattern past the limit


@given(st.one_of(spec_text, st.builds(lambda a, b: f"x/s-{{{a}..{b}}}.tar", ends, ends),
                 st.builds(lambda s: "pipe:" + s, spec_text)))
@example("pipe:curl -s http://x/s-{000000..999999999999}.tar")
@example("x/{a,b}{c,d}{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}{0..9}.tar")
def test_any_shard_spec_is_resolved_or_refused_in_bounded_time(tmp_path_factory, spec):
    cwd = tmp_path_factory.mktemp("spec")
    got = _refused_or_read(resolve_shards, spec, str(cwd / "cache"))
    assert isinstance(got, Exception) or len(got.urls) <= 1_000_000


@given(spec_text)
def test_any_url_list_file_is_resolved_or_refused(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("list") / "urls.txt"
    path.write_text(text)
    _refused_or_read(resolve_shards, str(path))


@pytest.mark.parametrize("command", ["false", "exit 3", "echo notatar", "head -c 700 {tar}", "cat {tar}",
                                     "cat /no/such/file", "kill -9 $$"])
def test_pipe_specs_that_fail_or_cut_short_are_one_counted_error(tmp_path, command):
    import io
    import tarfile

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("a.jpg", b"x" * 600), ("a.cls", b"1")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    (tmp_path / "s.tar").write_bytes(buf.getvalue())
    with time_limit(10, "pipe: shard"):
        items = list(iter_shard("pipe:" + command.format(tar=tmp_path / "s.tar")))
    errors = [i for i in items if isinstance(i, ShardError)]
    if command.startswith("cat {"):
        assert not errors and items[0]["cls"] == b"1"
    else:
        assert len(errors) == 1 and items[-1] is errors[0]
        one_line(errors[0].message)


# ----- config YAML and overrides --------------------------------------------------------------------------------
def _alias_bomb(levels: int, where: str) -> str:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, levels)]
    body = "\n".join("  " + line for line in lines)
    if where == "ds_config":
        dicts = ["  b0: &b0 {k0: 1, k1: 1, k2: 1, k3: 1, k4: 1, k5: 1, k6: 1, k7: 1, k8: 1, k9: 1}"]
        dicts += [f"  b{i}: &b{i} {{{', '.join(f'k{j}: *b{i - 1}' for j in range(10))}}}" for i in range(1, levels)]
        return "engine:\n  ds_config:\n" + "\n".join("  " + d for d in dicts) + "\n"
    return f"data:\n  shards: demo:digits\nextra:\n{body}\n"


@pytest.mark.parametrize("where", ["unknown_key", "ds_config"])
def test_yaml_alias_bombs_are_refused_fast(tmp_path, where):
    path = tmp_path / "bomb.yaml"
    path.write_text(_alias_bomb(9, where))  # 10^9 leaves once expanded
    got = _refused_or_read(load_config, str(path), allowed=(ConfigError,))
    assert isinstance(got, ConfigError)


yaml_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(
                               st.sampled_from(["data", "model", "train", "engine", "ds_config", "batch_size",
                                                "img_size", "depth", "name", "steps", "optim", "lr", "x"]),
                               inner, max_size=4), max_leaves=10)


@given(st.one_of(yaml_values.map(lambda v: yaml.safe_dump(v)), st.text(max_size=80),
                 st.builds(lambda n: "[" * n + "]" * n, st.integers(0, 50_000)),
                 st.builds(lambda n: "a:\n" + "".join(" " * (i + 1) + f"b{i}:\n" for i in range(n)),
                       st.integers(0, 3000)),
                 st.builds(lambda k, n: f"{k}: {'9' * n}\n", st.sampled_from(["data", "train"]),
                           st.integers(1, 6000))))
@example("data:\n  batch_size: 1e999\n")
@example("model:\n  img_size: 99999999999999999999999999999999\n")
def test_any_config_file_is_a_config_or_one_config_error(tmp_path_factory, text):
    path = tmp_path_factory.mktemp("cfg") / "c.yaml"
    path.write_text(text)
    _refused_or_read(load_config, str(path), allowed=(ConfigError,))


@given(st.lists(st.text(max_size=30), max_size=3) | st.lists(st.builds(
    lambda k, v: f"{k}={v}", st.sampled_from(["data.batch_size", "run.name", "engine.ds_config.x", "optim.lr",
                                              "model.depth"]), st.text(max_size=20)), max_size=3))
@example(["optim.lr=[1"])
@example(["run.name=: x"])
def test_any_override_is_applied_or_one_config_error(overrides):
    _refused_or_read(parse_overrides, overrides, allowed=(ConfigError,))


# ----- checkpoint metadata --------------------------------------------------------------------------------------
@given(st.binary(max_size=80) | st.builds(lambda v: json.dumps(v).encode(), json_values | st.fixed_dictionaries(
    {"files": json_values})))
@example(b'{"files": [1, 2]}')
@example(b'{"files": {"../../x": "big"}}')
def test_any_complete_marker_is_complete_or_a_reason(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("ck")
    (path / "COMPLETE").write_bytes(raw)
    ok, why = _refused_or_read(is_complete, path, allowed=())
    assert ok or why


@given(st.binary(max_size=80) | st.builds(lambda v: json.dumps(v).encode(), json_values | st.fixed_dictionaries(
    {"step": json_values}, optional={"config": json_values, "world_size": json_values, "samples": json_values,
                                     "lr_scale": json_values, "history": json_values})))
@example(b'{"step": 5, "config": []}')
@example(b'{"step": "5"}')
@example(b'{"step": 5, "config": {"model": 3}}')
def test_any_trainer_state_is_read_or_one_checkpoint_error(tmp_path_factory, raw):
    path = tmp_path_factory.mktemp("ck")
    (path / "trainer_state.json").write_bytes(raw)
    got = _refused_or_read(read_trainer_state, path, allowed=(VitscaleError,))
    if isinstance(got, dict):
        from vitscale.train.state import TrainState

        state = TrainState.from_saved(got)
        assert type(state.step) is int and state.step >= 0
        assert all(isinstance(v, dict) for v in got.get("config", {}).values())


def _torch_file() -> bytes:
    import io

    import torch

    buf = io.BytesIO()
    torch.save({"rng": torch.arange(5), "data": {"epoch": 1, "workers": [0.5, "x"]}}, buf)
    return buf.getvalue()


TORCH_FILE = _torch_file()


@given(st.one_of(st.binary(max_size=200), st.integers(0, len(TORCH_FILE)).map(lambda n: TORCH_FILE[:n]),
                 st.lists(st.tuples(st.integers(0, len(TORCH_FILE) - 1), st.integers(0, 255)), min_size=1,
                          max_size=4).map(lambda edits: _edited(TORCH_FILE, edits))))
def test_any_torch_file_is_loaded_or_one_checkpoint_error(tmp_path_factory, raw):
    """safeload.py: a per-rank state or weights file cut short or damaged is one CheckpointReadError (torch
    raised RuntimeError, EOFError, UnicodeDecodeError, IndexError, struct.error, KeyError ... before)."""
    from vitscale.distributed.safeload import safe_load

    path = tmp_path_factory.mktemp("pt") / "rank_00000.pt"
    path.write_bytes(raw)
    got = _refused_or_read(safe_load, path, allowed=(VitscaleError,))
    assert isinstance(got, (dict, VitscaleError)), type(got)


def _edited(data: bytes, edits) -> bytes:
    out = bytearray(data)
    for at, value in edits:
        out[at] = value
    return bytes(out)
