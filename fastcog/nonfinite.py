"""What a non-finite loss or gradient does: the step is skipped (fastcog.trainer.optimizer_update
never applies it), reported, counted; `max_in_a_row` consecutive ones stop the run.

A run that diverges for good would otherwise spend its remaining budget skipping steps, and a
single bad sample (a corrupt latent, an overflow) should cost one step, not the run.
"""

from __future__ import annotations

from collections.abc import Callable

from fastcog.errors import FastcogError


class NonfiniteSteps:
    def __init__(self, max_in_a_row: int) -> None:
        self.max_in_a_row = max_in_a_row
        self.in_a_row = 0
        self.total = 0

    def record(self, step: int, loss: float, grad_norm: float, skipped: bool,
               log: Callable[[str], None] | None = None) -> None:
        """Count step `step`; raise once max_in_a_row skipped steps follow each other."""
        if not skipped:
            self.in_a_row = 0
            return
        self.in_a_row += 1
        self.total += 1
        if log is not None:
            log(f"step {step}: loss {loss:.4g}, gradient norm {grad_norm:.4g}: not finite, step skipped "
                f"(weights unchanged; {self.in_a_row} in a row, {self.total} in this run)")
        if self.in_a_row >= self.max_in_a_row:
            raise FastcogError(
                f"{self.in_a_row} steps in a row had a non-finite loss or gradient (steps {step - self.in_a_row + 1}"
                f"-{step}), so training stopped; the weights are those of step {step - self.in_a_row} and no "
                "checkpoint was written since: lower optim.lr or check the data, then resume from the last checkpoint"
                " (train.max_nonfinite_steps sets how many are tolerated)"
            )
