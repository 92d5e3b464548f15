"""Long work off a terminal (a cluster job's log) prints plain lines with the rate and ETA."""

from pipeline.progress import Progress


def test_off_a_terminal_progress_is_plain_lines_with_rate_and_eta(capsys):
    with Progress(1_000, "embed", every_s=0.0) as bar:
        bar.update(250)
        bar.postfix("-ELBO 12.0")
        bar.update(750)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0].startswith("embed: 250/1,000 cells (25%), ") and "cells/s, ETA " in lines[0]
    assert lines[-1].startswith("embed: 1,000/1,000 cells (100%)") and "ETA" not in lines[-1]
    assert lines[-1].endswith("-ELBO 12.0") and not any("\r" in line for line in lines)
    with Progress(10, "quiet", enabled=False) as bar:
        bar.update(10)
    assert capsys.readouterr().err == ""
