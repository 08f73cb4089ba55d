"""Measures over simulated per-request results, shared by the closed-loop tests."""


def max_in_flight(results):
    """Most requests between arrival and last token at any instant."""
    events = sorted([(r.arrival_us, 1) for r in results] + [(r.finish_us, -1) for r in results])
    level = peak = 0
    for _, delta in events:  # at equal times, finishes (-1) sort first
        level += delta
        peak = max(peak, level)
    return peak
