"""The progress helper every step uses: a line at a steady rate, with count/total, rate, ETA."""

import logging

from common.progress import Progress


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_once_per_interval_with_count_rate_and_eta(caplog):
    clock = Clock()
    log = logging.getLogger("graft.test.progress")
    progress = Progress(log, "augment: decoded", 1000, every=10, clock=clock)
    with caplog.at_level(logging.INFO, logger="graft.test.progress"):
        for _ in range(40):  # 8 images a second (a step the float clock adds exactly)
            clock.now += 0.125
            progress.advance(1)
        assert caplog.messages == []  # 5 s in: nothing yet
        for _ in range(60):
            clock.now += 0.125
            progress.advance(1)
        progress.done()
    assert caplog.messages == [
        "augment: decoded: 80/1000 images (8.0%), 8.0 images/s, ETA 1m55s",
        "augment: decoded: 100/1000 images (10.0%), 8.0 images/s; done in 12s",
    ]


def test_progress_without_a_total_reports_count_and_rate(caplog):
    clock = Clock()
    progress = Progress(logging.getLogger("graft.test.p2"), "reads", None, unit="files",
                        every=5, clock=clock)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="graft.test.p2"):
        clock.now += 6
        progress.advance(3000)
    assert caplog.messages == ["reads: 3000 files, 500.0 files/s"]


def test_eta_reads_in_minutes_and_hours(caplog):
    clock = Clock()
    progress = Progress(logging.getLogger("graft.test.p3"), "features", 100_000, every=1,
                        unit="records", clock=clock)  # fmt: skip
    with caplog.at_level(logging.INFO, logger="graft.test.p3"):
        clock.now += 10
        progress.advance(200)  # 20 records/s, 99,800 left: 83 minutes
    assert caplog.messages == ["features: 200/100000 records (0.2%), 20.0 records/s, ETA 1h23m"]
