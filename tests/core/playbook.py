"""Scripts for core/attempts.py: events in (`>>`), the command each returns out (`<<`).

After mitmproxy's `Playbook` (test/mitmproxy/proxy/tutils.py): a test reads as the story of
one request, on a fake clock (`now` is in every event), and a mismatch prints the script
expected next to the one that ran.

    assert (Playbook(machine)
            >> Start(0.0)
            << Pick(None)
            >> Picked(0, 0.0)
            << Try(1, 0))
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

from sidecar.core.attempts import Attempts, Command
from sidecar.core.outcome import Outcome


class Event:
    def apply(self, m: Attempts) -> Command:
        raise NotImplementedError


@dataclass(frozen=True)
class Start(Event):
    now: float

    def apply(self, m: Attempts) -> Command:
        return m.start(self.now)


@dataclass(frozen=True)
class Picked(Event):
    index: int | None
    now: float

    def apply(self, m: Attempts) -> Command:
        return m.picked(self.index, self.now)


@dataclass(frozen=True)
class Ended(Event):
    no: int
    outcome: Outcome
    status: int | None
    now: float
    streamed: bool = False

    def apply(self, m: Attempts) -> Command:
        return m.ended(self.no, self.outcome, self.status, self.streamed, self.now)


@dataclass(frozen=True)
class Woke(Event):
    now: float

    def apply(self, m: Attempts) -> Command:
        return m.woke(self.now)


class Playbook:
    """Each event returns exactly one command, so a script alternates `>>` and `<<`."""

    def __init__(self, machine: Attempts) -> None:
        self.machine = machine
        self.expected: list[Event | Command] = []

    def __rshift__(self, event: Event) -> Playbook:
        self.expected.append(event)
        return self

    def __lshift__(self, command: Command) -> Playbook:
        self.expected.append(command)
        return self

    def __bool__(self) -> bool:
        actual: list[Event | Command | str] = []
        for entry in self.expected:
            if isinstance(entry, Event):
                actual.append(entry)
                try:
                    actual.append(entry.apply(self.machine))
                except AssertionError as e:
                    actual.append(f"AssertionError: {e}")
                    break
        if [repr(x) for x in actual] != [repr(x) for x in self.expected] or actual != self.expected:
            diff = "\n".join(difflib.ndiff([_line(x) for x in self.expected], [_line(x) for x in actual]))
            raise AssertionError(f"Playbook mismatch (- expected, + actual):\n{diff}")
        return True


def _line(x: object) -> str:
    return f"{'>>' if isinstance(x, Event) else '<<'} {x!r}"
