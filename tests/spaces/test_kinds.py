"""Contract tests over every parameter kind: valid kinds give Optuna distributions whose samples decode
into the space, bad ranges are rejected with the sub-key they concern, and the YAML form round-trips."""
from __future__ import annotations

import dataclasses

import optuna
import pytest
from optuna.distributions import BaseDistribution

from spaces.kinds import KINDS, Categorical, Fixed, Float, Int, KindError, PowerOfTwo, RatioTo
from spaces.syntax import parse_kind

optuna.logging.set_verbosity(optuna.logging.WARNING)

VALID = {
    "int": Int(1, 10),
    "int-log": Int(1, 128, log=True),
    "int-step": Int(0, 12, step=3),
    "float": Float(0.0, 0.2),
    "float-log": Float(1e-5, 1e-2, log=True),
    "float-step": Float(0.0, 1.0, step=0.25),
    "categorical-int": Categorical((1, 2, 4)),
    "categorical-str": Categorical(("random", "text")),
    "categorical-bool": Categorical((True, False)),
    "categorical-modules": Categorical((("query", "value"), ("query", "key", "value"))),
    "power-of-two": PowerOfTwo(1, 64),
    "ratio-categorical": RatioTo("r", Categorical((1.0, 2.0, 4.0))),
    "ratio-float": RatioTo("r", Float(0.5, 4.0)),
    "fixed": Fixed(3),
}


def test_every_registered_kind_is_covered():
    assert {type(kind).name for kind in VALID.values()} == set(KINDS)


def _inside(kind, value) -> bool:
    if isinstance(kind, RatioTo):
        return _inside(kind.ratio, value)
    if isinstance(kind, Float):
        inside = kind.low <= value <= kind.high
        return inside and (kind.step is None or abs((value - kind.low) / kind.step - round((value - kind.low) / kind.step)) < 1e-9)
    return value in kind.grid()


@pytest.mark.parametrize("name", sorted(VALID))
def test_samples_decode_inside_the_space(name):
    kind = VALID[name]
    distribution = kind.to_optuna()
    assert isinstance(distribution, BaseDistribution)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    optuna_name = kind.optuna_name("p")
    for _ in range(20):
        trial = study.ask({optuna_name: distribution})
        raw = trial.params[optuna_name]
        value = kind.decode(raw)
        assert _inside(kind, value), (name, raw, value)
        assert kind.encode(value) is not None  # a decoded value can be enqueued again
        study.tell(trial, 0.0)


@pytest.mark.parametrize("name", sorted(VALID))
def test_yaml_form_round_trips(name):
    kind = VALID[name]
    value_type = "float" if isinstance(kind, Float) else None
    assert parse_kind(kind.to_yaml(), value_type) == kind


@pytest.mark.parametrize("name", sorted(VALID))
def test_kinds_are_frozen(name):
    kind = VALID[name]
    field = dataclasses.fields(kind)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(kind, field, None)


def test_power_of_two_is_an_ordered_exponent():
    kind = PowerOfTwo(1, 64)
    assert kind.optuna_name("r") == "r_log2"
    distribution = kind.to_optuna()
    assert (distribution.low, distribution.high) == (0, 6)
    assert [kind.decode(k) for k in range(7)] == [1, 2, 4, 8, 16, 32, 64]
    assert kind.encode(8) == 3 and kind.encode(6) is None


def test_ratio_derives_the_target():
    kind = RatioTo("r", Categorical((1.0, 2.0)))
    assert kind.optuna_name("alpha_ratio") == "alpha_ratio"
    assert kind.optuna_name("lora_alpha") == "lora_alpha_ratio"
    assert RatioTo.derive(kind.decode(2.0), 8) == 16


def test_module_sets_are_stored_as_strings():
    kind = Categorical((("query", "value"), ("query", "key", "value")))
    assert kind.to_optuna().choices == ("query,value", "query,key,value")
    assert kind.decode("query,key,value") == ["query", "key", "value"]


BAD = [
    (lambda: Int(5, 1), "", "`low < high`"),
    (lambda: Int(3, 3), "", "`low < high`"),
    (lambda: Int(0, 10, log=True), ".low", "log range needs low >= 1"),
    (lambda: Int(1, 10, step=0), ".step", "must be >= 1"),
    (lambda: Int(0, 10, step=3), "", "multiple of step"),
    (lambda: Int(1.5, 3), ".low", "must be an integer"),
    (lambda: Float(1.0, 0.0), "", "`low < high`"),
    (lambda: Float(0.0, 1.0, log=True), ".low", "log range needs low > 0"),
    (lambda: Float(0.0, 1.0, step=-0.1), ".step", "must be > 0"),
    (lambda: Float(float("nan"), 1.0), ".low", "finite number"),
    (lambda: Categorical(()), "", "empty list"),
    (lambda: Categorical((1, 1)), "", "distinct"),
    (lambda: Categorical(({"a": 1},)), "", "choices must be"),
    (lambda: PowerOfTwo(3, 64), ".low", "power of two"),
    (lambda: PowerOfTwo(0, 8), ".low", "power of two"),
    (lambda: PowerOfTwo(8, 8), "", "`low < high`"),
    (lambda: RatioTo("r", Categorical((0.0, 1.0))), ".ratio", "must be > 0"),
    (lambda: RatioTo("", Fixed(2.0)), ".ratio_to", "another parameter"),
]


@pytest.mark.parametrize("build, subpath, message", BAD, ids=[message for _b, _s, message in BAD])
def test_bad_ranges_are_rejected(build, subpath, message):
    with pytest.raises(KindError) as caught:
        build()
    assert message in caught.value.message
    assert caught.value.subpath == subpath


@pytest.mark.parametrize("raw, value_type, expected", [
    ([1, 2, 4], None, Categorical((1, 2, 4))),
    ({"low": 1, "high": 8}, None, Int(1, 8)),
    ({"low": 1, "high": 8}, "float", Float(1.0, 8.0)),
    ({"low": 1.0e-5, "high": 1.0e-3, "log": True}, None, Float(1e-5, 1e-3, log=True)),
    ({"low": "1e-5", "high": "1e-3", "log": True}, None, Float(1e-5, 1e-3, log=True)),  # YAML 1.1 strings
    ({"power_of_two": [1, 64]}, None, PowerOfTwo(1, 64)),
    ({"ratio_to": "r", "ratio": [1, 2]}, None, RatioTo("r", Categorical((1.0, 2.0)))),
    ({"fixed": ["query", "value"]}, None, Fixed(("query", "value"))),
    (0.1, None, Fixed(0.1)),
])
def test_yaml_syntax(raw, value_type, expected):
    assert parse_kind(raw, value_type) == expected


@pytest.mark.parametrize("raw, value_type, subpath, message", [
    ({"low": 1}, None, "", "needs both low and high"),
    ({"low": 1, "high": 4, "lgo": True}, None, ".lgo", "unknown key 'lgo'"),
    ({"low": 1.5, "high": 4}, "int", ".low", "must be an integer"),
    ({"low": "fast", "high": 1.0}, "float", ".low", "must be a number"),
    ({"power_of_two": 4}, None, ".power_of_two", "[low, high]"),
    ({"ratio_to": "r"}, None, "", "needs `ratio:`"),
    ({"ratio_to": "r", "ratio": [0, 1]}, None, ".ratio", "must be > 0"),
])
def test_bad_yaml_syntax(raw, value_type, subpath, message):
    with pytest.raises(KindError) as caught:
        parse_kind(raw, value_type)
    assert message in caught.value.message
    assert caught.value.subpath == subpath
