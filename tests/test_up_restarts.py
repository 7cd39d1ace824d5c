"""`cortexx up`'s restart policy: a process stopped cleanly comes back at once, however often;
one that keeps crashing waits longer each time, until a healthy run resets the wait."""

from __future__ import annotations

from cli.up import CLEAN_EXIT_DELAY_S, HEALTHY_RUN_S, MAX_DELAY_S, Restarts


def test_clean_exits_come_back_at_once_however_often() -> None:
    restarts = Restarts("api", started_at=0.0)
    for i in range(10):  # six quick SIGTERMs kept the API down 30.9 s each under the old rule
        now = i * 1.0
        assert restarts.delay(0, now) == CLEAN_EXIT_DELAY_S
        restarts.started_at = now + CLEAN_EXIT_DELAY_S


def test_quick_crashes_back_off_and_a_healthy_run_resets_it() -> None:
    restarts = Restarts("worker", started_at=0.0)
    delays = []
    now = 0.0
    for _ in range(8):
        now += 1.0
        delays.append(restarts.delay(1, now))
        restarts.started_at = now
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, MAX_DELAY_S, MAX_DELAY_S]
    assert restarts.delay(-9, now + HEALTHY_RUN_S + 1) == 0.5
