import numpy as np
import pytest

from foundation.errors import RuntimeInputError, UsageError
from foundation.spec import Dim, InputSpec, TensorSpec


def test_parse_formats_back_to_the_same_text():
    text = ["input_ids:int64:[batch=1..16@4,seq=1..128@32]:0..30522", "attention_mask:int64:[batch,seq]:0..2"]
    spec = InputSpec.parse(text)
    assert spec["attention_mask"].dims == spec["input_ids"].dims
    assert str(spec["input_ids"]) == text[0]
    assert spec["attention_mask"].value_range == (0, 2)
    assert eval(repr(spec)) == spec  # repr is the code that rebuilds it
    assert eval(repr(Dim("b", 1, 2, 3))) == Dim("b", 1, 2, 3)


def test_opt_defaults_to_max_and_fixed_dims_parse():
    t = TensorSpec.parse("x:float32:[batch=1..32,3,224,224]")
    assert t.dims[0] == Dim("batch", 1, 32, 32)
    assert t.shape("min") == (1, 3, 224, 224)
    assert t.dims[1] == Dim.fixed(3)


@pytest.mark.parametrize("text, fragment", [
    ("x:float32:[batch=4..2@3]", "min <= opt <= max"),
    ("x:float32:[batch=1..8@9]", "min <= opt <= max"),
    ("x:float99:[3]", "dtype 'float99'"),
    ("x:float32:3,4", "name:dtype:[dims]"),
    ("x:float32:[seq]", "has no range"),
    ("x:int64:[3]:5..5", "is empty"),
    ("x:float32:[3,b@]", "neither a size"),
])
def test_bad_spec_text_is_a_usage_error_naming_the_fix(text, fragment):
    with pytest.raises(UsageError, match=fragment.replace("(", r"\(").replace("[", r"\[")):
        InputSpec.parse([text])


def test_one_dim_name_cannot_have_two_ranges():
    with pytest.raises(UsageError, match="two ranges"):
        InputSpec.parse(["a:float32:[b=1..4]", "c:float32:[b=1..8]"])


def test_override_replaces_named_inputs_and_rejects_unknown_names():
    spec = InputSpec.parse(["x:float32:[batch=1..32@8,3,224,224]"])
    small = spec.override(["x:float32:[batch=1..4@2,3,64,64]"])
    assert small.shapes("max") == {"x": (4, 3, 64, 64)}
    with pytest.raises(UsageError, match="the model's inputs are x"):
        spec.override(["y:float32:[1]"])


def test_override_of_a_shared_dim_applies_to_every_input_using_it():
    spec = InputSpec.parse(["ids:int64:[batch=1..16@4,seq=1..128@32]", "mask:int64:[batch,seq]"])
    small = spec.override(["ids:int64:[batch=1..4@2,seq=2..48@16]"])
    assert small.shapes("max") == {"ids": (4, 48), "mask": (4, 48)}


def test_json_round_trip_keeps_everything():
    spec = InputSpec.parse(["ids:int64:[b=1..8@2,s=1..64@8]:0..1000", "m:bool:[b,s]"])
    assert InputSpec.from_json(spec.to_json()) == spec


def test_random_feeds_follow_shapes_dtypes_and_value_ranges():
    spec = InputSpec.parse(["ids:int64:[b=1..8@2,s=3..64@8]:5..9", "x:float32:[b,4]:0..1", "m:bool:[b]"])
    for point in ("min", "opt", "max"):
        feeds = spec.random_feeds(point, seed=3)
        assert feeds["ids"].shape == spec["ids"].shape(point)
        assert feeds["ids"].dtype == np.int64 and feeds["ids"].min() >= 5 and feeds["ids"].max() < 9
        assert feeds["x"].dtype == np.float32 and 0 <= feeds["x"].min() and feeds["x"].max() < 1
        assert feeds["m"].dtype == bool
    a, b = spec.random_feeds("max", seed=1), spec.random_feeds("max", seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture()
def bert_like():
    return InputSpec.parse(["ids:int64:[batch=1..8@2,seq=1..16@8]:0..100", "mask:int64:[batch,seq]:0..2"])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda f: f.pop("mask"), "missing mask"),
        (lambda f: f.update(extra=np.zeros(1)), "unexpected extra"),
        (lambda f: f.update(ids=f["ids"].astype(np.int32)), "expected dtype int64, found int32"),
        (lambda f: f.update(ids=f["ids"][0]), "expected rank 2"),
        (
            lambda f: f.update(ids=np.zeros((9, 4), np.int64), mask=np.zeros((9, 4), np.int64)),
            r"dim 0 \(batch\) is 9, allowed 1..8",
        ),
        (lambda f: f.update(mask=np.zeros((2, 5), np.int64)), "inputs sharing a dim must agree"),
    ],
)
def test_check_feeds_names_the_input_the_dim_and_the_allowed_range(bert_like, change, message):
    feeds = bert_like.random_feeds("opt")
    bert_like.check_feeds(feeds)
    change(feeds)
    with pytest.raises(RuntimeInputError, match=message):
        bert_like.check_feeds(feeds)
