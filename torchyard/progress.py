"""What ``torchyard train`` shows: the network as a table, progress while training, a summary after."""

from __future__ import annotations

import sys
from typing import Any, TextIO

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

from torchyard.show import Eta, ending, epoch_line, is_plain
from worker.engine import Callback, RunState


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


class ProgressPrinter(Callback):
    """A line an epoch; on a terminal, a live bar of the epoch's batches below those lines (rich's, which
    leaves no bar behind in a pipe or a log)."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream or sys.stdout
        self.eta = Eta()
        self.bar: Progress | None = None
        if not is_plain(self.stream):
            self.bar = Progress(TextColumn("epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("batches"), console=Console(file=self.stream, highlight=False),
                                transient=True)
            self.task = self.bar.add_task("epoch", total=None, epoch="")

    def on_train_begin(self, state: RunState) -> None:
        if self.bar is not None:
            self.bar.start()

    def on_batch_end(self, state: RunState) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=state.batch, total=state.batches_per_epoch or None,
                            epoch=f"{state.epoch + 1}/{state.epochs}")

    def on_epoch_end(self, state: RunState, metrics: dict[str, Any]) -> None:
        line = epoch_line(metrics, state.epochs, self.eta.after(metrics, state.epochs))
        if self.bar is None:
            self.stream.write(line + "\n")
            self.stream.flush()
        else:
            self.bar.console.print(line, markup=False, highlight=False, soft_wrap=True)  # above the bar
            self.bar.reset(self.task, total=state.batches_per_epoch or None)

    def on_train_end(self, state: RunState, result: Any) -> None:
        self.close()

    def close(self) -> None:
        """Take the bar off the terminal (also when training raised)."""
        if self.bar is not None:
            self.bar.stop()


def summary_line(result, seconds: float) -> str:
    """How the run ended, in one line (a followed job of the service ends with the same)."""
    best = None
    if result.best_metric:
        best = {"metric": result.best_metric, "value": result.best_value, "epoch": result.best_epoch}
    return ending(result.status, result.epochs_completed, seconds, result.stop_reason, result.error, best)
