"""What ``torchyard train`` shows: the network as a table, progress while training, a summary after."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from worker.engine import Callback, RunState


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def network_table(plan, input_shape) -> str:
    """The network as torchsummary prints it: layer, output shape, parameters, and the totals."""
    rows = [("#", "Layer", "Output shape", "Param #"), ("", "Input", str(list(input_shape)), "")]
    rows += [(str(i), layer.type, str(list(layer.output_shape)), f"{layer.parameters:,}")
             for i, layer in enumerate(plan.layers)]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    line = "-" * (sum(widths) + 6)

    def fmt(row):
        return f"{row[0]:>{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:<{widths[2]}}  {row[3]:>{widths[3]}}"

    body = [fmt(rows[0]), line, *map(fmt, rows[1:]), line]
    return "\n".join(body + [f"Total parameters: {plan.total_parameters:,}"])


def epoch_line(metrics: dict[str, Any], epochs: int, eta_seconds: float) -> str:
    """``epoch  3/10  loss 0.4121  val_loss 0.3982  val_accuracy 0.8833  0.21s  ETA 0:02``."""
    width = len(str(epochs))
    shown = [f"{name} {metrics[name]:.4f}" for name in
             ("loss", "accuracy", "mae", "r2", "val_loss", "val_accuracy", "val_mae", "val_r2") if name in metrics]
    return (f"epoch {metrics['epoch']:>{width}}/{epochs}  " + "  ".join(shown)
            + f"  {metrics['epoch_seconds']:.2f}s  ETA {format_duration(eta_seconds)}")


class ProgressPrinter(Callback):
    """One line an epoch; on a terminal, a live batch counter within long epochs."""

    def __init__(self, stream: TextIO = sys.stdout, batch_refresh_seconds: float = 0.5):
        self.stream = stream
        self.live = stream.isatty()
        self.refresh = batch_refresh_seconds
        self.last_draw = 0.0
        self.epoch_seconds: list[float] = []

    def on_batch_end(self, state: RunState) -> None:
        if not self.live:
            return
        now = time.monotonic()
        if now - self.last_draw < self.refresh:
            return
        self.last_draw = now
        done = state.batch / state.batches_per_epoch
        bar = ("=" * int(done * 20)).ljust(20)
        self.stream.write(f"\repoch {state.epoch + 1}/{state.epochs} [{bar}] {state.batch}/{state.batches_per_epoch}")
        self.stream.flush()

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        self.epoch_seconds.append(metrics["epoch_seconds"])
        recent = self.epoch_seconds[-5:]
        eta = sum(recent) / len(recent) * (state.epochs - metrics["epoch"])
        clear = "\r\033[K" if self.live else ""
        self.stream.write(clear + epoch_line(metrics, state.epochs, eta) + "\n")
        self.stream.flush()


def summary_line(result, seconds: float) -> str:
    """How the run ended, in one line."""
    if result.status == "failed":
        return f"failed after {result.epochs_completed} epochs: {result.error}"
    if result.status == "stopped":
        return f"stopped ({result.stop_reason}) after {result.epochs_completed} epochs"
    best = ""
    if result.best_metric:
        best = f"; best {result.best_metric} {result.best_value:.4f} at epoch {result.best_epoch}"
    return (f"succeeded ({result.stop_reason}) after {result.epochs_completed} epochs in "
            f"{format_duration(seconds)}{best}")
