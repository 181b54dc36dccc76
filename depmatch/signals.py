"""Signal handlers for the length of a `with` block: the ranks' stop requests and the launcher's forwarding."""

from __future__ import annotations

import signal


class SignalHandlers:
    """Within `with`, each signal of `numbers` calls `on_signal(number)`; the handlers from before come back after."""

    def __init__(self, numbers):
        self._numbers = tuple(numbers)
        self.previous: dict = {}  # each signal's handler before the block

    def __enter__(self):
        for number in self._numbers:
            self.previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for number, handler in self.previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame) -> None:
        self.on_signal(number)

    def on_signal(self, number: int) -> None:
        raise NotImplementedError
