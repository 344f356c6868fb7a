"""The trainer's callback protocol. Training mechanics that change over time (the
expert-bias update, routing keys, balance monitoring, dense-to-sparse schedules) live in
callbacks, so the loop in ``trainer.py`` still reads top to bottom.

Every callback is Stateful: its ``state_dict()`` goes into every checkpoint under
``callback.<name>`` and comes back through ``load_state_dict`` on resume. A checkpoint
without a callback's entry (saved before the callback was enabled) leaves that callback
at its initial state, with a warning.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the trainer imports this module
    from moetrain.train.trainer import Trainer


class Callback:
    """Hooks, in the order one optimizer step calls them:

    - ``on_train_start(trainer)``: once, after resume, before the first step.
    - ``on_step_start(trainer, step, micro_batches)``: ``step`` is 0-based (the step being
      trained); ``micro_batches`` lists the dataset indices of this rank's micro-batches.
    - ``on_after_backward(trainer, step)``: all backward passes done, before gradient
      clipping and the optimizer step.
    - ``on_step_end(trainer, step, metrics)``: after the optimizer step; ``step`` is now
      the number of steps done. Callbacks may add entries to ``metrics`` (written to
      metrics.jsonl and TensorBoard right after). ``metrics["skipped"]`` is 1 when the
      step's update was skipped (non-finite loss or gradient norm, docs/nonfinite.md).
    - ``on_validation(trainer, step, val_loss)``: after each validation.
    """

    name = "callback"

    def on_train_start(self, trainer: Trainer) -> None:
        pass

    def on_step_start(self, trainer: Trainer, step: int, micro_batches: list[list[int]]) -> None:
        pass

    def on_after_backward(self, trainer: Trainer, step: int) -> None:
        pass

    def on_step_end(self, trainer: Trainer, step: int, metrics: dict[str, Any]) -> None:
        pass

    def on_validation(self, trainer: Trainer, step: int, val_loss: float) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}  # stateless; a callback with state returns it here

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        pass


class CallbackList:
    """Calls each hook on every callback, in order."""

    def __init__(self, callbacks: list[Callback]) -> None:
        names = [cb.name for cb in callbacks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"callbacks {dup} are given twice: list each name once in callbacks")
        self.callbacks = callbacks

    def __iter__(self):
        return iter(self.callbacks)

    def states(self) -> dict[str, Callback]:
        """Checkpoint entries: ``callback.<name>`` -> the callback (Stateful), for the
        callbacks that have state."""
        return {f"callback.{cb.name}": cb for cb in self.callbacks if cb.state_dict()}

    def on_train_start(self, trainer) -> None:
        for cb in self.callbacks:
            cb.on_train_start(trainer)

    def on_step_start(self, trainer, step, micro_batches) -> None:
        for cb in self.callbacks:
            cb.on_step_start(trainer, step, micro_batches)

    def on_after_backward(self, trainer, step) -> None:
        for cb in self.callbacks:
            cb.on_after_backward(trainer, step)

    def on_step_end(self, trainer, step, metrics) -> None:
        for cb in self.callbacks:
            cb.on_step_end(trainer, step, metrics)

    def on_validation(self, trainer, step, val_loss) -> None:
        for cb in self.callbacks:
            cb.on_validation(trainer, step, val_loss)


CALLBACKS: dict[str, Callable[[Any], Callback]] = {}


def register_callback(name: str):
    """Decorator: ``CALLBACKS[name] = factory``; the factory receives the root Config."""

    def deco(factory):
        CALLBACKS[name] = factory
        return factory

    return deco
