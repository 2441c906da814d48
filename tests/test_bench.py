"""metaembed.bench timing helpers (CPU-runnable; CUDA calls are faked)."""
from __future__ import annotations

import torch
from metaembed import bench


def test_time_ms_records_events_on_the_benchmarked_devices_stream(monkeypatch):
    """--device cuda:1 while cuda:0 is current: the events must bracket fn's work on cuda:1's stream,
    not the current device's (Event.record() without a stream), or the latency is ~0 and unsynchronised."""
    current = 0
    recorded = []

    class FakeEvent:
        def __init__(self, enable_timing=False):
            self.stream = None

        def record(self, stream=None):
            self.stream = stream if stream is not None else fake_current_stream()
            recorded.append(self.stream)

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return 1.0

    def fake_current_stream(device=None):
        dev = torch.device(device) if device is not None else torch.device("cuda", current)
        return f"stream-of-cuda:{current if dev.index is None else dev.index}"

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    monkeypatch.setattr(torch.cuda, "current_stream", fake_current_stream)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    mean, std = bench.time_ms(lambda: None, torch.device("cuda:1"), runs=3, warmup=1)
    assert (mean, std) == (1.0, 0.0)
    assert recorded == ["stream-of-cuda:1"] * 6
