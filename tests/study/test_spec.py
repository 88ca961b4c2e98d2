import pytest

from study.spec import RunSpec


def test_run_id_is_deterministic_readable_and_semantic():
    a = RunSpec(size="debug", lr=1e-3, budget=20)
    b = RunSpec(size="debug", lr=1e-3, budget=20, study="other", num_workers=4, micro_batch_size=2)
    assert a.run_id == b.run_id  # study / runtime-only fields do not change what is computed
    assert a.run_id.startswith("swift_v2-debug-sp-S20-")
    assert RunSpec(size="debug", lr=2e-3, budget=20).run_id != a.run_id
    assert RunSpec(size="debug", lr=1e-3, budget=20, width=16).run_id.startswith("swift_v2-debug-w16-sp-")


def test_json_round_trip_keeps_identity():
    s = RunSpec(size="debug", cohorts={"b": 0.5, "a": 0.5}, model_overrides={"mask_ratio": 0.6}, grid=[24, 24, 24])
    t = RunSpec.from_json(s.to_json())
    assert t == s and t.run_id == s.run_id
    assert s.cohorts == (("a", 0.5), ("b", 0.5))


@pytest.mark.parametrize("field,value,needle", [
    ("budget", 0, "budget"), ("budget", float("nan"), "budget"), ("schedule", "linear", "schedule"),
    ("strategy", "adapter", "strategy"), ("parametrization", "ntk", "parametrization"),
    ("zero_stage", 4, "zero_stage"), ("batch_size", 0, "batch_size"), ("scaling", "zscore", "scaling"),
])
def test_bad_fields_raise_value_error_naming_the_field(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        RunSpec(**{field: value})


def test_unknown_field_is_rejected():
    with pytest.raises(ValueError, match="unknown RunSpec fields"):
        RunSpec.from_dict({"sise": "debug"})


def test_deepspeed_config_must_be_a_json_object_and_is_not_semantic():
    with pytest.raises(ValueError, match="deepspeed_config is not JSON"):
        RunSpec(deepspeed_config="{overlap_comm: true}")
    with pytest.raises(ValueError, match="JSON object"):
        RunSpec(deepspeed_config="[1, 2]")
    a = RunSpec(size="debug")
    b = a.replace(deepspeed_config='{"zero_optimization": {"overlap_comm": true}}', compile=True)
    assert a.run_id == b.run_id  # runtime knobs: same computation, same run


def test_gc_every_is_a_non_negative_runtime_knob():
    with pytest.raises(ValueError, match="gc_every=-1 must be >= 0"):
        RunSpec(gc_every=-1)
    a = RunSpec(size="debug")
    assert a.gc_every == 10 and a.replace(gc_every=0).run_id == a.run_id  # same computation, same run
