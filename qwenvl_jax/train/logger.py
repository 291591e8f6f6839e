"""The run logger of the training loop: per optimizer step, a JSONL line, TensorBoard scalars and a
progress bar; at close, a PNG of the curves. What it writes under `run_dir`:

    metrics.jsonl      one `json.dumps(row)` line per step, flushed per line. A fresh run (start_step 0)
                       starts it anew; a resumed run keeps the lines with step <= start_step (a killed run
                       may have logged past its last checkpoint), so it holds the run's whole history.
    tensorboard/events.out.tfevents.{time}.{host}.{pid}.{n}
                       one file per `RunLogger` (a resumed run adds one): each numeric key but "step" as a
                       scalar tagged with the key. It opens with a SessionLog START at start_step + 1, so
                       TensorBoard drops the steps that earlier files logged past the resume point.
    loss_curves.png    from the whole metrics.jsonl: a panel per `PLOT_KEYS` key present (loss always).

The event files are TFRecords of hand-encoded `Event` protobufs: no tensorflow or protobuf at run time.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
import sys
import time
from pathlib import Path

PLOT_KEYS = ("loss", "rewards/margins", "rewards/accuracies", "grad_norm")
PANEL_SIZE = (640, 220)
RAW_COLOR = (158, 202, 225)  # the raw values; drawn in SMOOTH_COLOR when there are too few to smooth
SMOOTH_COLOR = (31, 119, 180)
EMA_WEIGHT = 0.6  # TensorBoard's default smoothing
BAR_WIDTH = 20


def _crc32c_entry(n: int) -> int:
    for _ in range(8):
        n = (n >> 1) ^ 0x82F63B78 if n & 1 else n >> 1  # Castagnoli polynomial, bit-reversed
    return n


_CRC32C_TABLE = [_crc32c_entry(n) for n in range(256)]


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord(data: bytes) -> bytes:
    """One TFRecord: uint64 length, masked crc32c of the length, data, masked crc32c of the data."""
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


def _varint(n: int) -> bytes:
    n &= (1 << 64) - 1  # int64 negatives are encoded as their 64-bit two's complement
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    if wire_type == 2:  # length-delimited: string or nested message
        payload = _varint(len(payload)) + payload
    return _varint(number << 3 | wire_type) + payload


def _float32(value: float) -> bytes:
    try:
        return struct.pack("<f", value)
    except OverflowError:  # finite doubles beyond float32 range round to infinity, as a float32 cast does
        return struct.pack("<f", math.copysign(math.inf, value))


def encode_event(wall_time: float, step: int, payload: bytes) -> bytes:
    """A serialized `Event`: wall_time (field 1, double), step (field 2, int64), then `payload`, one of the
    fields below."""
    return _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step)) + payload


FILE_VERSION = _field(3, 2, b"brain.Event:2")
# SessionLog {status (field 1) = START (1)}: TensorBoard drops the steps >= this event's already read.
SESSION_START = _field(7, 2, _field(1, 0, _varint(1)))


def summary(scalars: dict[str, float]) -> bytes:
    """Event.summary (field 5): Summary {repeated value (1): Value {tag (1) string, simple_value (2) float}}."""
    values = (_field(1, 2, _field(1, 2, k.encode()) + _field(2, 5, _float32(v))) for k, v in scalars.items())
    return _field(5, 2, b"".join(values))


def format_duration(seconds: float) -> str:
    """1h02m03s, 2m13s, 7s."""
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m{secs:02d}s"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def read_metrics(path: Path) -> list[dict]:
    """The rows of a metrics.jsonl; a half-written last line (the process was killed mid-write) is dropped."""
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    lines = [line for line in text.splitlines() if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            if i < len(lines) - 1:
                raise ValueError(f"{path}: line {i + 1} is not JSON: {line[:80]!r}") from err
    return rows


def _ema(values: list[float], weight: float) -> list[float]:
    out, acc = [], 0.0
    for i, v in enumerate(values, start=1):
        acc = weight * acc + (1 - weight) * v
        out.append(acc / (1 - weight**i))  # debiased so the curve starts at the first value, not at 0
    return out


def _label(draw, font, x: float, y: float, text: str, ha: float = 0.0, va: float = 0.0) -> None:
    """`text` with the point at fractions (ha, va) of its box (0 = left/top, 1 = right/bottom) at (x, y)."""
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    draw.text((x - left - ha * (right - left), y - top - va * (bottom - top)), text, fill="black", font=font)


def _panel(draw, font, offset: int, key: str, points: list[tuple[int, float]]) -> None:
    width, height = PANEL_SIZE
    left, right, top, bottom = 70, width - 20, offset + 26, offset + height - 28
    _label(draw, font, left, offset + 8, key)
    draw.rectangle((left, top, right, bottom), outline=(120, 120, 120))
    if not points:
        _label(draw, font, left + 10, top + 10, "no finite values")
        return
    steps, values = [s for s, _ in points], [v for _, v in points]
    s_lo, s_hi, v_lo, v_hi = min(steps), max(steps), min(values), max(values)
    x0, kx = left + 4, (right - left - 8) / ((s_hi - s_lo) or 1)
    y0, ky = bottom - 4, (bottom - top - 8) / ((v_hi - v_lo) or 1.0)
    _label(draw, font, left - 6, y0 - (v_hi - v_lo) * ky, f"{v_hi:.4g}", ha=1.0, va=0.5)
    _label(draw, font, left - 6, y0, f"{v_lo:.4g}", ha=1.0, va=0.5)
    _label(draw, font, left, bottom + 6, str(s_lo))
    _label(draw, font, right, bottom + 6, str(s_hi), ha=1.0)
    _label(draw, font, (left + right) / 2, bottom + 6, "step", ha=0.5)
    smooth = len(points) > 20
    curves = [(values, RAW_COLOR if smooth else SMOOTH_COLOR)]
    if smooth:
        curves.append((_ema(values, EMA_WEIGHT), SMOOTH_COLOR))
    for ys, color in curves:
        line = [(x0 + (s - s_lo) * kx, y0 - (v - v_lo) * ky) for s, v in zip(steps, ys, strict=True)]
        if len(line) == 1:
            (x, y) = line[0]
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=color)
        else:
            draw.line(line, fill=color, width=2)


def plot_curves(rows: list[dict], path: Path) -> None:
    """One panel per `PLOT_KEYS` key present in `rows` (loss always), stacked top to bottom."""
    from PIL import Image, ImageDraw, ImageFont

    keys = [k for k in PLOT_KEYS if k == "loss" or any(k in row for row in rows)]
    image = Image.new("RGB", (PANEL_SIZE[0], PANEL_SIZE[1] * len(keys)), "white")
    draw, font = ImageDraw.Draw(image), ImageFont.load_default()
    for p, key in enumerate(keys):
        points = [(r["step"], float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
        _panel(draw, font, p * PANEL_SIZE[1], key, [(s, v) for s, v in points if math.isfinite(v)])
    image.save(path, format="PNG")


class RunLogger:
    """Logs one row of metrics per optimizer step (see the module docstring for the files it writes)."""

    def __init__(
        self,
        run_dir,
        total_steps: int,
        start_step: int = 0,
        *,
        tensorboard: bool = True,
        progress: bool = True,
        plot: bool = True,
        stream=None,
    ):
        if total_steps < 1 or not 0 <= start_step <= total_steps:
            raise ValueError(f"need 0 <= start_step <= total_steps >= 1, got {start_step=}, {total_steps=}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.total, self.start = int(total_steps), int(start_step)
        self.progress, self.plot = progress, plot
        self.stream = sys.stderr if stream is None else stream
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.metrics_path = self.run_dir / "metrics.jsonl"
        kept = read_metrics(self.metrics_path) if self.start > 0 else []
        kept = [row for row in kept if row["step"] <= self.start]
        tmp = self.metrics_path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in kept), encoding="utf-8")
        tmp.replace(self.metrics_path)
        self._jsonl = self.metrics_path.open("a", encoding="utf-8")
        self.skipped_steps = sum(1 for row in kept if row.get("skipped"))
        self._times: list[float] = []  # time_s of this process's steps; the first includes compilation
        self._bar, self._events = "", None
        if tensorboard:
            tb_dir = self.run_dir / "tensorboard"
            tb_dir.mkdir(exist_ok=True)
            if self.start == 0:
                for old in tb_dir.glob("events.out.tfevents.*"):
                    old.unlink()
            # TensorBoard reads a run's files in name order; the counter orders files made within a second.
            count = len(list(tb_dir.glob("events.out.tfevents.*")))
            name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}.{count}"
            self._events = (tb_dir / name).open("wb")
            now = time.time()
            self._events.write(tfrecord(encode_event(now, 0, FILE_VERSION)))
            self._events.write(tfrecord(encode_event(now, self.start + 1, SESSION_START)))
            self._events.flush()

    def log(self, row: dict) -> None:
        """Record one optimizer step's metrics; `row["step"]` (an int) is required."""
        if not isinstance(row.get("step"), int):
            raise ValueError(f"a metrics row needs an int 'step', got keys {sorted(row)}")
        self._jsonl.write(json.dumps(row) + "\n")
        self._jsonl.flush()
        if self._events is not None:
            scalars = {k: v for k, v in row.items() if k != "step" and isinstance(v, (int, float))}
            self._events.write(tfrecord(encode_event(time.time(), row["step"], summary(scalars))))
            self._events.flush()
        self.skipped_steps += bool(row.get("skipped"))
        if isinstance(row.get("time_s"), (int, float)):
            self._times.append(float(row["time_s"]))
        if self.progress:
            self._show(row)

    def eta_s(self, step: int) -> float | None:
        """Seconds left after `step`, from the mean step time of this process past its first step."""
        rest = self._times[1:]
        return sum(rest) / len(rest) * max(0, self.total - step) if rest else None

    def progress_line(self, row: dict) -> str:
        step = row["step"]
        done = min(BAR_WIDTH, BAR_WIDTH * step // self.total)
        bar = "=" * done + (">" + " " * (BAR_WIDTH - done - 1) if done < BAR_WIDTH else "")
        parts = [f"step {step}/{self.total} [{bar}]"]
        if isinstance(row.get("loss"), (int, float)):
            parts.append(f"loss {row['loss']:.4f}")
        if isinstance(row.get("tokens_per_s"), (int, float)):
            parts.append(f"tok/s {row['tokens_per_s']:.0f}")
        eta = self.eta_s(step)
        parts.append("eta ?" if eta is None else f"eta {format_duration(eta)}")
        if self.skipped_steps:
            parts.append(f"skipped {self.skipped_steps}")
        if row.get("records_skipped"):
            parts.append(f"bad records {row['records_skipped']}")
        return " ".join(parts)

    def _show(self, row: dict) -> None:
        line = self.progress_line(row)
        if self.tty:
            self._bar = line
            self.stream.write("\r\x1b[K" + line)  # \x1b[K clears what a longer previous bar left
        elif row["step"] % max(1, self.total // 20) == 0 or row["step"] >= self.total:
            self.stream.write(line + "\n")
        self.stream.flush()

    def message(self, text: str) -> None:
        """Write `text` as its own line; on a TTY the bar is cleared first and redrawn below it."""
        redraw = self.tty and bool(self._bar)
        self.stream.write(("\r\x1b[K" if redraw else "") + text + "\n" + (self._bar if redraw else ""))
        self.stream.flush()

    def close(self) -> None:
        """Flush and close the files, end the bar's line and write loss_curves.png."""
        if self._jsonl.closed:
            return
        self._jsonl.close()
        if self._events is not None:
            self._events.close()
        if self.tty and self._bar:
            self.stream.write("\n")
        self.stream.flush()
        if self.plot:
            plot_curves(read_metrics(self.metrics_path), self.run_dir / "loss_curves.png")

    def __enter__(self) -> RunLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
