"""The cluster flags of `blis replay` / `blis run` and `blis policies`, end to end through the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

from blis_cal.simulate.cluster.decisions import read_decisions

COEFFS = ["--alpha", "20000,0,0", "--beta", "10000,30,500"]


def _blis(*args):
    return subprocess.run(
        [sys.executable, "-m", "blis_cal", *args], capture_output=True, text=True, timeout=120
    )


def test_replay_across_instances_with_a_policy_file_and_flag_overrides(tmp_path, trace_c):
    policy = tmp_path / "policy.yaml"
    policy.write_text(
        "instances: 4\n"
        "routing:\n  policy: round-robin\n  snapshot_refresh_us: 5000\n"
        "admission:\n  policy: always-admit\n"
    )
    decisions = tmp_path / "d.jsonl"
    out = _blis(
        "replay",
        str(trace_c),
        *COEFFS,
        "--policy-config",
        str(policy),
        "--instances",
        "3",  # the flag beats the file's 4
        "--routing-policy",
        "weighted",
        "--routing-scorers",
        "prefix-affinity:3,queue-depth:2",
        "--trace-decisions",
        str(decisions),
        "--results",
        str(tmp_path / "r.json"),
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    cluster = summary["cluster"]
    assert cluster["instances"] == 3 and len(cluster["per_instance"]) == 3
    assert cluster["policy"]["routing"]["policy"] == "weighted"
    assert cluster["policy"]["routing"]["snapshot_refresh_us"] == 5000  # kept from the file
    assert cluster["admitted"] + cluster["rejected"] == cluster["arrived"] == summary["requests"]
    lines = read_decisions(decisions)
    assert len(lines) == cluster["admitted"]
    assert set(lines[0]["candidates"][0]["scores"]) == {"prefix-affinity", "queue-depth"}
    results = json.loads((tmp_path / "r.json").read_text())
    assert len(results) == summary["completed"]


def test_run_with_token_bucket_rejects_and_counts(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text(
        "admission:\n  policy: token-bucket\n  token_bucket_capacity: 2000\n  token_bucket_refill_rate: 500\n"
    )
    out = _blis(
        "run",
        "--rate",
        "20",
        "--num-requests",
        "200",
        "--input-tokens",
        "200",
        "--output-tokens",
        "20",
        *COEFFS,
        "--instances",
        "2",
        "--policy-config",
        str(policy),
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    # 2000-token burst (10 requests) + 500 tokens/s (2.5 requests/s) over ~10 s: far fewer than 200.
    assert 0 < summary["cluster"]["admitted"] < 60
    assert summary["rejected"] == summary["cluster"]["rejected_by_admission"] > 100


def test_bad_policy_file_is_one_line_naming_file_line_and_key(tmp_path):
    policy = tmp_path / "p.yaml"
    policy.write_text("instances: 2\nrouting:\n  policy: weighted\n  scorer: []\n")
    out = _blis("run", "--rate", "5", "--num-requests", "5", *COEFFS, "--policy-config", str(policy))
    assert out.returncode == 2
    assert f"{policy}:4: routing.scorer: unknown key" in out.stderr
    assert "Traceback" not in out.stderr
    out = _blis("run", "--rate", "5", "--num-requests", "5", *COEFFS, "--admission-policy", "maybe")
    assert out.returncode == 2 and "allowed: always-admit, reject-all, token-bucket" in out.stderr
    out = _blis("run", "--rate", "5", "--num-requests", "5", *COEFFS, "--routing-scorers", "queue-depth:1")
    assert out.returncode == 2 and "--routing-scorers needs --routing-policy weighted" in out.stderr


def test_policies_lists_every_registry():
    out = _blis("policies")
    assert out.returncode == 0, out.stderr
    listed = json.loads(out.stdout)
    assert "prefix-affinity" in listed["routing_scorers"]
    assert {"fcfs", "priority-fcfs", "sjf"} <= set(listed["scheduler_policies"])
    assert listed["priority_policies"] == ["constant", "slo-based", "vllm"]
    assert "gamma" in listed["arrival_processes"] and "lognormal" in listed["length_distributions"]
    assert listed["think_time_distributions"] == ["constant", "lognormal"]
    assert "prefix-heavy" in listed["workload_presets"] and "blackbox-ctx" in listed["model_forms"]


def test_the_readme_policy_example_parses():
    from pathlib import Path

    from blis_cal.simulate.cluster import parse_policy_config

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("### Cluster policy YAML", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = parse_policy_config(example, "README.md")
    assert (cfg.instances, cfg.admission, cfg.routing, cfg.scheduler) == (
        4,
        "token-bucket",
        "weighted",
        "priority-fcfs",
    )
    assert [s.name for s in cfg.scorers] == ["prefix-affinity", "queue-depth", "kv-utilization"]


def test_cluster_runs_are_byte_identical_across_processes_and_hash_seeds(tmp_path, trace_c):
    import os

    outs = []
    for hash_seed in ("1", "2"):
        decisions = tmp_path / f"d{hash_seed}.jsonl"
        args = [
            *COEFFS,
            "--instances",
            "3",
            "--routing-policy",
            "weighted",
            "--trace-decisions",
            str(decisions),
        ]
        proc = subprocess.run(
            [sys.executable, "-m", "blis_cal", "replay", str(trace_c), *args],
            capture_output=True,
            text=True,
            timeout=120,
            env=os.environ | {"PYTHONHASHSEED": hash_seed},
        )
        assert proc.returncode == 0, proc.stderr
        outs.append((proc.stdout, decisions.read_bytes()))
    assert outs[0] == outs[1]
    assert json.loads(outs[0][0])["prefix_hit_rate"] > 0  # the prefix-affinity index was exercised


def test_usage_errors_are_a_short_message_and_exit_code_2_not_a_traceback():
    for args in (("no-such-command",), ("replay", "--no-such-option"), ("replay",)):
        proc = _blis(*args)
        assert proc.returncode == 2, args
        assert "Traceback" not in proc.stderr and "Error:" in proc.stderr and "--help" in proc.stderr, args
