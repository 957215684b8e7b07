"""Progress output: a tqdm bar on a terminal; off one, a plain line every 10% (or 30 s), never a `\\r`."""

import io

from tqdm import tqdm

from gptwo.progress import PlainProgress, progress_bar


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_off_a_terminal_prints_plain_lines_with_step_loss_speed_and_eta():
    log = io.StringIO()
    bar = progress_bar("train", total=200, unit="step", file=log)
    assert isinstance(bar, PlainProgress)
    with bar:
        for step in range(200):
            bar.update(1)
            bar.set_postfix_str(f"loss {5 - step / 100:.3f} | 12,345 tok/s")
    text = log.getvalue()
    lines = text.splitlines()
    assert "\r" not in text and len(lines) == 10  # every 10% of 200 steps
    assert lines[0].startswith("train: step 20/200 (10%) | loss ") and lines[-1].startswith(
        "train: step 200/200 (100%)"
    )
    assert all("tok/s" in line and "elapsed" in line and "ETA" in line for line in lines)


def test_plain_lines_also_come_by_time_and_resume_from_the_initial_step():
    log = io.StringIO()
    bar = PlainProgress("train", total=1000, initial=500, unit="step", file=log, every_seconds=0.0)
    bar.update(1)
    bar.update(1)
    assert log.getvalue().splitlines() == [
        line for line in log.getvalue().splitlines() if line.startswith("train: step 50")
    ]
    assert len(log.getvalue().splitlines()) == 2 and "\r" not in log.getvalue()


def test_unknown_total_prints_amount_and_rate():
    log = io.StringIO()
    bar = PlainProgress("tokenizing", total=None, unit="char", file=log, every_seconds=0.0)
    bar.update(2_500_000)
    assert log.getvalue().startswith("tokenizing: 2.5M char | ") and "char/s" in log.getvalue()


def test_on_a_terminal_a_live_tqdm_bar_and_disabled_prints_nothing():
    assert isinstance(progress_bar("train", total=10, file=FakeTerminal()), tqdm)
    quiet = io.StringIO()
    with progress_bar("train", total=10, file=quiet, enabled=False) as bar:
        bar.update(5)
    assert quiet.getvalue() == ""


def test_the_eta_leaves_out_the_first_steps_warm_up(monkeypatch):
    import gptwo.progress as progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    log = io.StringIO()
    bar = PlainProgress("train", total=100, unit="step", file=log, every_seconds=1e9)
    clock[0] = 60.0  # the first step compiles: a minute
    bar.update(1)
    assert "ETA" not in bar.line()  # no rate after the warm-up yet
    for _ in range(10):
        clock[0] += 0.5  # then half a second a step
        bar.update(1)
    line = bar.line()
    assert "elapsed 1:05" in line and "ETA 0:44" in line  # 89 steps left at 0.5 s, not at 65 s / 11 steps
