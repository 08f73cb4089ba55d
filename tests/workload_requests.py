"""A WorkloadRequest built from a few numbers, for tests that drive the observer by hand."""

from blis_cal.workload import WorkloadRequest


def workload_request(
    rid: int,
    *,
    arrival_us: int = 0,
    n_in: int = 20,
    n_out: int = 5,
    prefix: int = 0,
    group: str = "",
    tenant: str = "",
    slo: str = "",
    token_seed: int = 3,
) -> WorkloadRequest:
    context = ((f"prefix:{group}", prefix),) if prefix else ()
    context += ((f"req:{rid}", n_in),)
    return WorkloadRequest(
        request_id=rid,
        client_id="c",
        tenant_id=tenant,
        slo_class=slo,
        arrival_us=arrival_us,
        prefix_group=group,
        prefix_length=prefix,
        input_tokens=n_in,
        output_tokens=n_out,
        session_id="",
        round_index=0,
        streaming=True,
        think_time_us=0,
        token_seed=token_seed,
        context=context,
    )
