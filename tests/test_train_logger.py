"""The run logger: JSONL history and its truncation on resume, TensorBoard files read back by tensorboard's
own reader, the progress bar (non-TTY lines, TTY redraws, ETA) and the loss-curve PNG."""

from __future__ import annotations

import io
import json
import math
import os

import numpy as np
import pytest
from PIL import Image

from qwenvl_jax.train import logger as logger_mod
from qwenvl_jax.train.logger import RunLogger, crc32c, format_duration, masked_crc32c


class TTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _rows(steps, loss=lambda s: 1.0 / s, **extra):
    return [{"step": s, "loss": loss(s), "time_s": 0.5, "tokens_per_s": 1000.0, **extra} for s in steps]


def _log_all(run_dir, rows, total, start=0, **kwargs):
    kwargs.setdefault("stream", io.StringIO())
    with RunLogger(run_dir, total, start, **kwargs) as log:
        for row in rows:
            log.log(row)
    return kwargs["stream"]


def _jsonl_steps(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines]


def _scalars(tb_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


# ------------------------------------------------------------------------------------------ tfevents
def test_crc32c_matches_the_reference():
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c as tb_masked

    assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
    rng = np.random.default_rng(0)
    for n in (0, 1, 8, 100, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert masked_crc32c(data) == tb_masked(data)


def test_tensorboard_scalars_read_back(tmp_path):
    rows = [
        {"step": 1, "loss": 0.75, "tokens": 96, "rewards/margins": -0.125, "grad_norm": 1e40, "note": "x"},
        {"step": 2, "loss": 1 / 3, "tokens": 64, "rewards/margins": 0.3, "grad_norm": math.nan},
        {"step": 3, "loss": -math.inf, "tokens": 32, "rewards/margins": 2.0, "grad_norm": 0.1},
    ]
    _log_all(tmp_path, rows, total=3, plot=False)
    tb_dir = tmp_path / "tensorboard"
    assert len(list(tb_dir.iterdir())) == 1
    for tag in ("loss", "tokens", "rewards/margins"):
        got = _scalars(tb_dir, tag)
        assert [s for s, _ in got] == [1, 2, 3]
        assert [v for _, v in got] == [float(np.float32(r[tag])) for r in rows]
    grad = _scalars(tb_dir, "grad_norm")
    assert grad[0][1] == math.inf and math.isnan(grad[1][1]) and grad[2][1] == float(np.float32(0.1))

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tb_dir))
    acc.Reload()
    assert sorted(acc.Tags()["scalars"]) == ["grad_norm", "loss", "rewards/margins", "tokens"]
    assert acc.file_version == 2.0


def test_tensorboard_resume_replaces_steps_past_the_checkpoint(tmp_path):
    _log_all(tmp_path, _rows(range(1, 7), loss=float), total=8, plot=False)
    _log_all(tmp_path, _rows(range(5, 9), loss=lambda s: 100.0 + s), total=8, start=4, plot=False)
    assert len(list((tmp_path / "tensorboard").iterdir())) == 2
    assert _scalars(tmp_path / "tensorboard", "loss") == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 105.0), (6, 106.0), (7, 107.0), (8, 108.0)
    ]  # fmt: skip
    # A fresh run in the same directory starts the event files anew.
    _log_all(tmp_path, _rows([1], loss=lambda s: 7.0), total=8, plot=False)
    assert len(list((tmp_path / "tensorboard").iterdir())) == 1
    assert _scalars(tmp_path / "tensorboard", "loss") == [(1, 7.0)]


# ------------------------------------------------------------------------------------------------ JSONL
def test_jsonl_truncated_on_resume_and_fresh_otherwise(tmp_path):
    _log_all(tmp_path, _rows(range(1, 11)), total=20, tensorboard=False, plot=False)
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 11, "lo')  # killed mid-write
    _log_all(tmp_path, _rows([7, 8]), total=20, start=6, tensorboard=False, plot=False)
    assert _jsonl_steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[0] == _rows([1])[0]

    _log_all(tmp_path, _rows([1]), total=20, tensorboard=False, plot=False)
    assert _jsonl_steps(tmp_path) == [1]


def test_bad_inputs_are_named(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n{"step": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not JSON"):
        RunLogger(tmp_path, 10, 1, tensorboard=False, stream=io.StringIO())
    with pytest.raises(ValueError, match="start_step=11"):
        RunLogger(tmp_path, 10, 11, stream=io.StringIO())
    with RunLogger(tmp_path / "b", 10, plot=False, stream=io.StringIO()) as log:
        with pytest.raises(ValueError, match=r"needs an int 'step'.*'loss'"):
            log.log({"loss": 1.0})


# --------------------------------------------------------------------------------------------- progress
def test_progress_lines_when_not_a_tty(tmp_path):
    rows = _rows(range(1, 101), loss=lambda s: 0.4312)
    rows[2]["skipped"], rows[40]["skipped"] = 1, 1
    for row in rows[30:]:
        row["records_skipped"] = 2
    out = _log_all(tmp_path, rows, total=100, tensorboard=False, plot=False).getvalue()
    lines = out.splitlines()
    assert len(lines) == 20 and "\r" not in out
    assert [line.split()[1] for line in lines] == [f"{s}/100" for s in range(5, 101, 5)]
    assert lines[0] == "step 5/100 [=>                  ] loss 0.4312 tok/s 1000 eta 48s skipped 1"
    assert lines[6].startswith("step 35/100 [=======>") and lines[6].endswith("skipped 1 bad records 2")
    assert (
        lines[-1]
        == "step 100/100 [====================] loss 0.4312 tok/s 1000 eta 0s skipped 2 bad records 2"
    )

    # Fewer steps than 20: a line per step; the last step always prints.
    out = _log_all(tmp_path / "b", _rows(range(1, 8)), total=7, tensorboard=False, plot=False).getvalue()
    assert len(out.splitlines()) == 7
    out = _log_all(tmp_path / "c", _rows(range(1, 44)), total=43, tensorboard=False, plot=False).getvalue()
    assert [line.split()[1] for line in out.splitlines()] == [f"{s}/43" for s in (*range(2, 43, 2), 43)]


def test_eta_excludes_the_first_step_of_the_process(tmp_path):
    stream = io.StringIO()
    with RunLogger(tmp_path, 10, 4, tensorboard=False, plot=False, stream=stream) as log:
        log.log({"step": 5, "time_s": 100.0})  # compilation
        assert log.eta_s(5) is None
        log.log({"step": 6, "time_s": 2.0})
        assert log.eta_s(6) == pytest.approx(2.0 * 4)
        log.log({"step": 7, "time_s": 4.0})
        assert log.eta_s(7) == pytest.approx(3.0 * 3)
        log.log({"step": 8, "time_s": 250.0})
    etas = [line.split("eta ")[1] for line in stream.getvalue().splitlines()]
    assert etas == ["?", "8s", "9s", "2m51s"]  # (2 + 4 + 250) / 3 * 2 = 170.7 s
    assert [format_duration(s) for s in (0, 7.4, 133, 3600, 3723)] == [
        "0s",
        "7s",
        "2m13s",
        "1h00m00s",
        "1h02m03s",
    ]


def test_tty_redraws_one_line_and_messages_clear_it(tmp_path):
    stream = TTY()
    with RunLogger(tmp_path, 50, tensorboard=False, plot=False, stream=stream) as log:
        for row in _rows(range(1, 4)):
            log.log(row)
        log.message("saved checkpoint 3")
    out = stream.getvalue()
    assert out.count("\n") == 2 and out.endswith("\n")  # the message and the bar's end at close
    assert out.count("\r\x1b[K") == 4  # three redraws and the message's clear
    screen = out.split("\n")
    assert screen[0].endswith("\r\x1b[Ksaved checkpoint 3")
    assert screen[1].startswith("step 3/50 [=>")


def test_message_without_a_tty(tmp_path):
    stream = io.StringIO()
    with RunLogger(tmp_path, 5, tensorboard=False, plot=False, stream=stream) as log:
        log.message("resumed from step 0")
        log.log(_rows([1])[0])
    assert stream.getvalue().splitlines() == ["resumed from step 0", "step 1/5 [====>               ] loss 1.0000 tok/s 1000 eta ?"]  # fmt: skip


# ---------------------------------------------------------------------------------------------- the PNG
def _curve_columns(image, panel: int, color) -> dict[int, float]:
    """Mean row (within the panel) of the pixels of exactly `color`, per image column that has any."""
    height = logger_mod.PANEL_SIZE[1]
    pix = np.asarray(image.convert("RGB"))[panel * height : (panel + 1) * height]
    ys, xs = np.nonzero(np.all(pix == np.asarray(color, np.uint8), axis=-1))
    return {int(x): float(ys[xs == x].mean()) for x in np.unique(xs)}


@pytest.mark.parametrize("num", [12, 40])
def test_png_decreasing_loss_is_drawn_falling(tmp_path, num):
    rows = _rows(range(1, num + 1), loss=lambda s: 5.0 - 0.1 * s)
    rows[3]["loss"] = math.nan  # non-finite values are skipped, not drawn
    _log_all(tmp_path, rows, total=num, tensorboard=False)
    image = Image.open(tmp_path / "loss_curves.png")
    assert image.size == logger_mod.PANEL_SIZE  # loss only: no DPO keys, no grad_norm
    for color in [logger_mod.SMOOTH_COLOR] + ([logger_mod.RAW_COLOR] if num > 20 else []):
        columns = _curve_columns(image, 0, color)
        assert len(columns) > 0.8 * (logger_mod.PANEL_SIZE[0] - 90)  # it spans the plot's width
        leftmost, rightmost = columns[min(columns)], columns[max(columns)]
        assert leftmost < rightmost - 100  # image rows grow downwards: the start is higher
    assert not _curve_columns(image, 0, logger_mod.RAW_COLOR) or num > 20


def test_png_panels_history_and_determinism(tmp_path):
    def dpo(s):
        margins = -abs(s - 10.0)  # peaks in the middle of the whole history
        return {"rewards/margins": margins, "rewards/accuracies": 0.5, "grad_norm": 1.0 + s}

    first = [{**row, **dpo(row["step"])} for row in _rows(range(1, 11))]
    second = [{**row, **dpo(row["step"])} for row in _rows(range(11, 20))]
    _log_all(tmp_path / "a", first, total=19)
    _log_all(tmp_path / "a", second, total=19, start=10)  # resumed: this process saw steps 11..19 only
    image = Image.open(tmp_path / "a" / "loss_curves.png")
    assert image.size == (logger_mod.PANEL_SIZE[0], 4 * logger_mod.PANEL_SIZE[1])
    margins = _curve_columns(image, 1, logger_mod.SMOOTH_COLOR)  # panels: loss, margins, accuracies, grad
    peak = min(margins, key=margins.get)
    assert abs(peak - (min(margins) + max(margins)) / 2) < 0.1 * (max(margins) - min(margins))
    assert _curve_columns(image, 2, logger_mod.SMOOTH_COLOR)  # a constant series is still drawn

    _log_all(tmp_path / "b", first + second, total=19)
    assert (tmp_path / "a" / "loss_curves.png").read_bytes() == (
        tmp_path / "b" / "loss_curves.png"
    ).read_bytes()
    assert sorted(os.listdir(tmp_path / "b")) == ["loss_curves.png", "metrics.jsonl", "tensorboard"]
