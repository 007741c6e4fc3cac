"""The model and objective records a weights file carries (an export's metadata) are checked before anything is
built from them: the record says how large a network to build, only the tensors beside it are real. Depth 10**7
built blocks for hours; widths of the wrong type, heads of 0 or a record that is a list were tracebacks."""
import json
import re
import time

import pytest
from safetensors.torch import save_file

from vitscale.models import create_model
from vitscale.weights import WeightsError, load_model

RECORD = {"name": "vit_micro_patch4", "img_size": 32, "num_classes": 10}


def _export(path, model_record, objective_record='{"name": "supervised"}', objective="supervised", data_record="{}"):
    model = create_model("vit_micro_patch4", img_size=32, num_classes=10)
    meta = {"vitscale_model": model_record if isinstance(model_record, str) else json.dumps(model_record),
            "vitscale_objective": objective, "vitscale_objective_config": objective_record,
            "vitscale_part": "full", "step": "3", "vitscale_data_config": data_record}
    save_file(model.state_dict(), str(path), metadata=meta)
    return path


@pytest.mark.parametrize("record, words", [
    ({**RECORD, "depth": 10 ** 7}, "model.depth=10000000, beyond any ViT"),
    ({**RECORD, "decoder_depth": 10 ** 7}, "model.decoder_depth=10000000, beyond any ViT"),
    ({**RECORD, "num_heads": 0}, "model.num_heads must be >= 1"),
    ({**RECORD, "patch_size": 0}, "model.patch_size must be >= 1"),
    ({**RECORD, "depth": "abc"}, "model.depth"),
    ({**RECORD, "depth": 2.5}, "model.depth"),
    ({**RECORD, "embed_dim": 1e9}, "model.embed_dim"),
    ({**RECORD, "depth": 5}, "says depth 5 but its tensors hold"),
    ({**RECORD, "embed_dim": 64}, "says width 64 but its patch embedding is"),
    ({**RECORD, "name": "vit_enormous_patch4"}, "cannot be built"),
    ([1, 2], "is not a model config"),
    ({"img_size": 32}, "is not a model config"),
    ("[" * 5000 + "]" * 5000, "metadata is not JSON"),
    ("{not json", "metadata is not JSON"),
])
def test_a_record_that_cannot_be_built_is_one_line_naming_the_file(tmp_path, record, words):
    path = _export(tmp_path / "m.safetensors", record)
    started = time.perf_counter()
    with pytest.raises(WeightsError) as e:
        load_model(path)
    message = str(e.value)
    assert str(path) in message and words in message and "\n" not in message, message
    assert time.perf_counter() - started < 30  # nothing large was built first


def test_an_objective_record_of_another_shape_takes_the_defaults_and_one_of_wrong_types_is_refused(tmp_path):
    model, info = load_model(_export(tmp_path / "a.safetensors", RECORD, objective_record="[1]"))
    assert info["num_classes"] == 10 and info["objective_cfg"] == {}
    with pytest.raises(WeightsError, match="its objective record cannot be used .*objective.label_smoothing"):
        load_model(_export(tmp_path / "b.safetensors", RECORD,
                           objective_record='{"name": "supervised", "label_smoothing": "x"}'))


def test_a_good_record_with_keys_of_a_newer_version_still_loads(tmp_path):
    model, info = load_model(_export(tmp_path / "m.safetensors", {**RECORD, "a_key_from_the_future": 1}))
    reference = create_model("vit_micro_patch4", img_size=32, num_classes=10)
    assert info["name"] == "vit_micro_patch4" and (info["depth"], info["embed_dim"]) == (reference.depth,
                                                                                          reference.embed_dim)


@pytest.mark.parametrize("data, words", [('{"eval_crop_pct": 0}', "eval_crop_pct=0, not a number in (0, 1]"),
                                         ('{"eval_crop_pct": null}', "eval_crop_pct=None"),
                                         ('{"interpolation": "nearest"}', "interpolation='nearest', not one of")])
def test_held_out_image_settings_a_file_carries_are_checked(tmp_path, data, words):
    """eval_crop_pct 0 or interpolation 'nearest' in an export failed every held-out image ('no samples read');
    null was a TypeError."""
    path = _export(tmp_path / "m.safetensors", RECORD, data_record=data)
    with pytest.raises(WeightsError, match=f"m.safetensors: its data record has {re.escape(words)}"):
        load_model(path)
