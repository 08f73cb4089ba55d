"""Workloads: the spec YAML, presets and scenarios, samplers, the generator and ServeGen / trace import."""

from blis_cal.workload.fit_trace import spec_from_trace
from blis_cal.workload.generator import Workload, generate
from blis_cal.workload.options import workload_from_options
from blis_cal.workload.presets import preset_spec, workload_presets
from blis_cal.workload.request import WorkloadRequest
from blis_cal.workload.samplers import arrival_samplers, length_samplers
from blis_cal.workload.servegen import servegen_spec
from blis_cal.workload.spec import WorkloadSpec, load_spec, parse_spec, spec_to_yaml

__all__ = [
    "Workload",
    "WorkloadRequest",
    "WorkloadSpec",
    "arrival_samplers",
    "generate",
    "length_samplers",
    "load_spec",
    "parse_spec",
    "preset_spec",
    "servegen_spec",
    "spec_from_trace",
    "spec_to_yaml",
    "workload_from_options",
    "workload_presets",
]
