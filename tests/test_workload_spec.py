"""Workload spec YAML: strict parsing (a table of bad specs, each one line naming the key path), round trips."""

import copy

import pytest
import yaml

from blis_cal.errors import ConfigError
from blis_cal.workload import generate, load_spec, parse_spec, preset_spec, spec_to_yaml, workload_presets

GOOD = {
    "version": "2",
    "seed": 7,
    "aggregate_rate": 12.5,
    "num_requests": 300,
    "horizon": 60_000_000,
    "clients": [
        {
            "id": "chat",
            "tenant_id": "t1",
            "slo_class": "critical",
            "rate_fraction": 0.7,
            "arrival": {"process": "gamma", "cv": 2.0},
            "input_distribution": {
                "type": "gaussian",
                "params": {"mean": 200, "std_dev": 50, "min": 10, "max": 900},
            },
            "output_distribution": {"type": "exponential", "params": {"mean": 100}},
            "prefix_group": "sys",
            "prefix_length": 128,
            "streaming": True,
            "reasoning": {
                "multi_turn": {"max_rounds": 3, "think_time_us": 500_000, "context_growth": "accumulate"}
            },
        },
        {
            "id": "batch",
            "slo_class": "batch",
            "rate_fraction": 0.3,
            "arrival": {"process": "weibull", "cv": 0.5},
            "input_distribution": {"type": "empirical", "params": {"100": 0.5, "400": 0.5}},
            "output_distribution": {"type": "constant", "params": {"value": 32}},
        },
        {
            "id": "users",
            "slo_class": "standard",
            "concurrency": 4,
            "think_time_us": 1000,
            "input_distribution": {"type": "lognormal", "params": {"mu": 5, "sigma": 0.4}},
            "output_distribution": {
                "type": "pareto_lognormal",
                "params": {"alpha": 2, "xm": 50, "mu": 4, "sigma": 0.5, "mix_weight": 0.1},
            },
        },
    ],
    "goodput_slo_targets": {"critical": {"ttft_ms": 200, "e2e_ms": 5000}},
}


def with_change(path, value):
    """GOOD with one key set (value=...) or deleted (value=DELETE); path like 'clients.0.arrival.cv'."""
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    node = data
    for key in parents:
        node = node[int(key)] if isinstance(node, list) else node[key]
    key = int(last) if isinstance(node, list) else last
    if value is DELETE:
        del node[key]
    else:
        node[key] = value
    return data


DELETE = object()

BAD = [
    ("extra", 1, "t.yaml.extra: unknown key; allowed: version"),
    ("version", "3", "t.yaml.version: '3' is not allowed; allowed: 1, 2"),
    ("seed", -1, "t.yaml.seed: must be >= 0"),
    ("seed", "x", "t.yaml.seed: expected a whole number"),
    ("aggregate_rate", float("nan"), "t.yaml.aggregate_rate: must be finite"),
    ("aggregate_rate", -2, "t.yaml.aggregate_rate: must be >= 0"),
    ("aggregate_rate", DELETE, "t.yaml.aggregate_rate: must be > 0 when a client is rate-based"),
    ("num_requests", 1.5, "t.yaml.num_requests: expected a whole number"),
    ("horizon", -5, "t.yaml.horizon: must be >= 0"),
    ("category", "video", "t.yaml.category: 'video' is not allowed"),
    ("clients", [], "t.yaml.clients: required, a non-empty list"),
    ("clients", DELETE, "t.yaml.clients: required"),
    ("cohorts", [], "t.yaml.cohorts: cohorts are not supported by blis-cal"),
    ("clients.0", "chat", "t.yaml.clients[0]: expected a mapping"),
    ("clients.0.id", DELETE, "t.yaml.clients[0].id: required"),
    ("clients.1.id", "chat", "t.yaml.clients[1].id: duplicate client id 'chat'"),
    ("clients.0.colour", "red", "t.yaml.clients[0].colour: unknown key; allowed: id, tenant_id"),
    ("clients.0.lifecycle", {}, "t.yaml.clients[0].lifecycle: lifecycle windows are not supported"),
    (
        "clients.0.slo_class",
        "gold",
        "t.yaml.clients[0].slo_class: 'gold' is not allowed; allowed: '', critical",
    ),
    ("clients.1.slo_class", DELETE, "t.yaml.clients[1].slo_class: set slo_class on all clients or on none"),
    ("clients.0.rate_fraction", 0, "t.yaml.clients[0].rate_fraction: must be > 0"),
    ("clients.0.rate_fraction", "half", "t.yaml.clients[0].rate_fraction: expected a number"),
    ("clients.2.rate_fraction", 1, "t.yaml.clients[2]: rate_fraction and concurrency are mutually exclusive"),
    ("clients.2.concurrency", 0, "t.yaml.clients[2].concurrency: must be >= 1"),
    (
        "clients.2.arrival",
        {"process": "poisson"},
        "t.yaml.clients[2].arrival: closed-loop (concurrency) clients",
    ),
    ("clients.1.think_time_us", 5, "t.yaml.clients[1].think_time_us: only for concurrency clients"),
    ("clients.2.think_time_us", -5, "t.yaml.clients[2].think_time_us: must be >= 0"),
    (
        "clients.0.arrival.process",
        "burst",
        "t.yaml.clients[0].arrival.process: 'burst' is not allowed; allowed: constant",
    ),
    ("clients.0.arrival.cv", -1, "t.yaml.clients[0].arrival.cv: must be > 0"),
    ("clients.0.arrival.rate", 3, "t.yaml.clients[0].arrival.rate: unknown key"),
    ("clients.1.arrival.cv", 50, "t.yaml.clients[1].arrival.cv: weibull cv must be in [0.01, 10.4]"),
    ("clients.0.arrival", {"process": "poisson", "cv": 2}, "t.yaml.clients[0].arrival.cv: not a parameter"),
    (
        "clients.0.input_distribution.type",
        "zipf",
        "t.yaml.clients[0].input_distribution.type: 'zipf' is not allowed",
    ),
    ("clients.0.input_distribution.type", DELETE, "t.yaml.clients[0].input_distribution.type: required"),
    (
        "clients.0.input_distribution.params.std_dev",
        DELETE,
        "t.yaml.clients[0].input_distribution.params.std_dev: required",
    ),
    (
        "clients.0.input_distribution.params.max",
        5,
        "t.yaml.clients[0].input_distribution.params.max: must be >= min",
    ),
    (
        "clients.0.input_distribution.file",
        "x.csv",
        "t.yaml.clients[0].input_distribution.file: distributions from files",
    ),
    (
        "clients.0.output_distribution.params.mean",
        0,
        "t.yaml.clients[0].output_distribution.params.mean: must be > 0",
    ),
    (
        "clients.1.input_distribution.params",
        {"x": 1},
        "t.yaml.clients[1].input_distribution.params.x: key must be",
    ),
    (
        "clients.1.output_distribution.params.value",
        -3,
        "t.yaml.clients[1].output_distribution.params.value: must be",
    ),
    ("clients.0.prefix_length", -1, "t.yaml.clients[0].prefix_length: must be >= 0"),
    ("clients.1.prefix_length", 10, "t.yaml.clients[1].prefix_length: needs a prefix_group"),
    ("clients.0.streaming", "yes", "t.yaml.clients[0].streaming: expected true or false"),
    (
        "clients.0.reasoning.multi_turn.max_rounds",
        0,
        "t.yaml.clients[0].reasoning.multi_turn.max_rounds: must be >= 1",
    ),
    (
        "clients.0.reasoning.multi_turn.context_growth",
        "grow",
        "t.yaml.clients[0].reasoning.multi_turn.context_growth",
    ),
    (
        "clients.0.reasoning.multi_turn.rounds",
        2,
        "t.yaml.clients[0].reasoning.multi_turn.rounds: unknown key",
    ),
    (
        "clients.0.reasoning.reason_ratio_distribution",
        {},
        "t.yaml.clients[0].reasoning.reason_ratio_distribution: reason",
    ),
    (
        "clients.1.closed_loop",
        True,
        "t.yaml.clients[1].closed_loop: only meaningful with reasoning.multi_turn",
    ),
    ("goodput_slo_targets.critical.ttft_ms", -1, "t.yaml.goodput_slo_targets.critical.ttft_ms: must be > 0"),
    ("goodput_slo_targets.gold", {}, "t.yaml.goodput_slo_targets.gold: 'gold' is not allowed"),
    ("servegen_data", {"path": "x"}, "t.yaml: clients and servegen_data are mutually exclusive"),
    ("rate", 3, "t.yaml.rate: alias of aggregate_rate; give only one of them"),
]


def test_good_spec_parses():
    spec = parse_spec(GOOD, "t.yaml")
    assert [c.id for c in spec.clients] == ["chat", "batch", "users"]
    assert spec.prefix_lengths() == {"sys": 128}
    assert spec.clients[0].is_closed_loop and spec.clients[2].is_closed_loop
    assert not spec.clients[1].is_closed_loop


@pytest.mark.parametrize(("path", "value", "message"), BAD, ids=[b[0] for b in BAD])
def test_bad_spec_is_one_line_error_naming_the_key(path, value, message):
    with pytest.raises(ConfigError) as info:
        parse_spec(with_change(path, value), "t.yaml")
    text = str(info.value)
    assert "\n" not in text
    assert text.startswith(message), text


def test_rate_is_an_alias_of_aggregate_rate():
    data = copy.deepcopy(GOOD)
    data["rate"] = data.pop("aggregate_rate")
    assert parse_spec(data, "t.yaml") == parse_spec(GOOD, "t.yaml")


def test_version_1_renames_slo_classes():
    data = with_change("version", "1")
    data["clients"][0]["slo_class"] = "realtime"
    data["clients"][1]["slo_class"] = "interactive"
    spec = parse_spec(data, "t.yaml")
    assert [c.slo_class for c in spec.clients] == ["critical", "standard", "standard"]
    assert spec.version == "2"


def test_prefix_length_set_by_first_client_of_group_default_50():
    data = copy.deepcopy(GOOD)
    data["clients"][1]["prefix_group"] = "sys"
    data["clients"][1]["prefix_length"] = 999
    data["clients"][2]["prefix_group"] = "other"
    spec = parse_spec(data, "t.yaml")
    assert spec.prefix_lengths() == {"sys": 128, "other": 50}


@pytest.mark.parametrize("name", workload_presets.names())
def test_yaml_round_trip_of_presets(name):
    spec = preset_spec(name, 3.5, 100)
    again = parse_spec(yaml.safe_load(spec_to_yaml(spec)), name)
    assert again == spec
    assert generate(again).requests == generate(spec).requests


def test_yaml_round_trip_of_full_spec(tmp_path):
    spec = parse_spec(GOOD, "t.yaml")
    path = tmp_path / "spec.yaml"
    path.write_text(spec_to_yaml(spec))
    assert load_spec(path) == spec


def test_load_spec_reports_bad_yaml_with_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("clients:\n  - id: [unclosed\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: line \d+ not valid YAML"):
        load_spec(path)


def test_load_spec_names_the_file(tmp_path):
    path = tmp_path / "w.yaml"
    path.write_text("aggregate_rate: 1\nclients: [{id: a}]\n")
    with pytest.raises(ConfigError, match=r"w\.yaml\.clients\[0\]\.input_distribution: required"):
        load_spec(path)
