"""cryodask.progress on a real LocalCluster: counts, untouched results, lines, time left, RELION's point count."""

from __future__ import annotations

import io
import time

import pytest

from cryodask.progress import JobProgress, format_seconds, hidden_variable_sampling_points


@pytest.fixture(scope="module")
def client():
    from cryodask.cluster.local import local_client

    with local_client(1) as c:
        yield c


def _slow_square(x: int) -> int:
    time.sleep(0.02)
    return x * x


def _fail(x: int) -> int:
    raise RuntimeError(f"task {x} failed")


def test_track_counts_every_future_and_leaves_the_results(client):
    out = io.StringIO()
    p = JobProgress("refine3d", stream=out)
    futs = [client.submit(_slow_square, i, pure=False) for i in range(9)]
    assert p.track(futs, "it001 E-step") == 9
    assert all(f.status == "finished" for f in futs)
    assert client.gather(futs) == [i * i for i in range(9)]
    assert p.tracked == [9]
    assert "0/9" in out.getvalue() and "refine3d it001 E-step" in out.getvalue()  # a bar was drawn (and cleared)


def test_no_bars_when_stderr_is_a_batch_log(client, capsys, monkeypatch):
    """The process's stderr redirected to a file (a batch job): lines only, no bar, without --quiet; a terminal
    gets the bar."""
    import sys

    p = JobProgress("class2d", total_iterations=2)  # stderr under pytest's capture: not a terminal
    assert p.track([client.submit(_slow_square, i, pure=False) for i in range(3)], "it001") == 3
    p.iteration_done(1, 1.0)
    err = capsys.readouterr().err
    assert "class2d it001/002" in err and "/3" not in err and "\r" not in err
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    p = JobProgress("class2d")
    p.track([client.submit(_slow_square, 1, pure=False)], "it001")
    assert "0/1" in capsys.readouterr().err


def test_track_returns_when_a_task_fails(client):
    out = io.StringIO()
    p = JobProgress("class3d", stream=out)
    futs = [client.submit(_slow_square, 1, pure=False), client.submit(_fail, 2, pure=False)]
    assert p.track(futs) == 2 and p.tracked == [2]
    assert futs[1].status == "error"  # the caller's gather raises, not track
    with pytest.raises(RuntimeError, match="task 2 failed"):
        client.gather(futs)


def test_quiet_drops_the_bar_and_keeps_the_lines(client):
    out = io.StringIO()
    p = JobProgress("class2d", quiet=True, total_iterations=4, stream=out)
    link = p.start(client)
    assert link == client.dashboard_link and link.startswith("http")
    assert p.track([client.submit(_slow_square, 3, pure=False)]) == 1
    line = p.iteration_done(1, 2.0, sampling_points=170496, resolution=22.857)
    text = out.getvalue()
    assert text.splitlines() == [f"class2d: dashboard {link}", line]
    assert line == "class2d it001/004: 170,496 sampling points/particle, resolution 22.86 Å, 2.0 s, about 6.0 s left"


def test_time_left_uses_the_last_iterations():
    p = JobProgress("refine3d", total_iterations=10, stream=None)
    for it, s in enumerate([100.0, 1.0, 2.0, 3.0], start=1):
        p.iteration_done(it, s)
    assert p.seconds_left(4) == pytest.approx(6 * 2.0)  # mean of the last 3 × 6 to go
    assert JobProgress("x", stream=None).seconds_left(3) is None  # no total: no estimate
    assert "left" not in JobProgress("x", stream=None).iteration_done(1, 1.0)
    assert format_seconds(42.4) == "42 s" and format_seconds(185) == "3 min 05 s"
    assert format_seconds(7620) == "2 h 07 min"


def test_no_stream_prints_nothing(client, capsys):
    p = JobProgress("refine3d", stream=None)
    p.start(client)
    p.track([client.submit(_slow_square, 2, pure=False)])
    p.iteration_done(1, 1.0)
    assert capsys.readouterr() == ("", "")
    assert len(p.lines) == 2


def test_hidden_variable_sampling_points_match_relions_log():
    """RELION 3.1 relion_refine_mpi --auto_refine, HEALPix order 2 (192 directions, psi 15°: 24), 37 translations:
    'Oversampling= 0 NrHiddenVariableSamplingPoints= 170496', 'Oversampling= 1 ... 5455872'."""
    assert hidden_variable_sampling_points(1, 192, 24, 37) == 170496
    assert hidden_variable_sampling_points(1, 192, 24, 37, oversampling=1) == 5455872
    # 2D: one direction, psi children 2^os, translation children 4^os
    assert hidden_variable_sampling_points(50, 1, 36, 21, oversampling=1, ref_dim=2) == 50 * 72 * 84


def test_lines_to_a_log_bars_to_the_stream(client):
    out, got = io.StringIO(), []
    p = JobProgress("refine3d", stream=out, log=got.append)
    p.track([client.submit(_slow_square, 2, pure=False)], "it001")
    line = p.iteration_done(1, 1.0)
    assert got == [line] == p.lines and line not in out.getvalue() and "it001" in out.getvalue()
