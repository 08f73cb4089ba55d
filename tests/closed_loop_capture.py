"""A closed-loop capture as `observe` records it, with the simulator playing the server: every row's arrival is
its predecessor's answer + think time, one chunk per token."""

from blis_cal.replay import results_to_trace
from blis_cal.replay.from_trace import SERVER_FIELDS
from blis_cal.replay.from_workload import follow_up_for, requests_from_workload, workload_trace
from blis_cal.simulate import BlackboxModel, SimConfig, simulate
from blis_cal.trace import ServerInfo, Trace
from blis_cal.workload import generate, parse_spec

MODEL = BlackboxModel((1000.0, 1.0, 100.0), (5000.0, 10.0, 200.0))
CONFIG = SimConfig(block_size=16, num_gpu_blocks=4096, max_num_seqs=64, max_num_batched_tokens=2048)


def gaussian(mean, std_dev, lo, hi) -> dict:
    return {"type": "gaussian", "params": {"mean": mean, "std_dev": std_dev, "min": lo, "max": hi}}


def users_client(users, think: dict, inputs=(300, 80, 20, 600), outputs=(60, 20, 5, 120), **keys) -> dict:
    """A spec client of `users` closed-loop users; `think` holds its think_time_us or think_time_distribution."""
    return {
        "id": "u",
        "concurrency": users,
        **think,
        "input_distribution": gaussian(*inputs),
        "output_distribution": gaussian(*outputs),
        **keys,
    }


def captured(
    multi_turn=None,
    think_us=200_000,
    num_requests=60,
    model=MODEL,
    users=4,
    start_together=False,
    config: SimConfig = CONFIG,
) -> Trace:
    """`users` users pausing `think_us`; they start u·think/N apart, or all at 0 with `start_together` (a
    constant think-time distribution, as BLIS's --think-time-dist); the server is `config`."""
    think = (
        {"think_time_distribution": {"type": "constant", "params": {"value": think_us}}}
        if start_together
        else {"think_time_us": think_us}
    )
    client = users_client(users, think)
    if multi_turn:
        client["reasoning"] = {"multi_turn": multi_turn}
    workload = generate(parse_spec({"num_requests": num_requests, "seed": 5, "clients": [client]}, "t"))
    bridge = follow_up_for(workload)
    run = simulate(requests_from_workload(workload), config, model, bridge, record_tokens=True)
    trace = results_to_trace(
        run, workload_trace(workload, bridge.released), output_delay_us=model.output_delay_us()
    )
    trace.header.server = ServerInfo(
        type="blis-sim", **{name: getattr(config, name) for name in SERVER_FIELDS}
    )
    return trace
