"""Reload bookkeeping: which generation of workers serves, which is starting.

Every worker belongs to a generation, a number the master bumps for
each reload.  A reload (HUP, ``forkserver ctl reload``) starts a whole
new generation beside the serving one; only once every worker of the
new generation has reported ready does it become the serving
generation, and the workers of every older generation are retired
(they finish the connections they hold, then exit).  If a worker of the
new generation cannot boot, the reload is abandoned: its generation is
stopped and the serving one carries on untouched.

Reloads never overlap: one asked for while another is starting is
remembered (any number of them merge into one) and begins as soon as
the current one ends, so a burst of HUPs costs at most two generations
of processes at a time and the last HUP is always honoured.

Pure state: nothing here forks, signals or reads a file.
"""

from __future__ import annotations

from dataclasses import dataclass


class GenerationError(Exception):
    """An impossible transition: a bug in the master."""


@dataclass
class Generations:
    serving: int = 0
    starting: int | None = None
    again: bool = False
    completed: int = 0

    @property
    def reloading(self) -> bool:
        return self.starting is not None

    def request(self) -> bool:
        """A reload was asked for: True to begin it now, False if it must wait."""
        if self.starting is None:
            return True
        self.again = True
        return False

    def begin(self) -> int:
        """The number of the generation a reload is about to start."""
        if self.starting is not None:
            raise GenerationError(f"generation {self.starting} is still starting")
        self.starting = max(self.serving, self.completed) + 1
        return self.starting

    def commit(self) -> int:
        """The starting generation is ready and now serves; the one it replaced."""
        if self.starting is None:
            raise GenerationError("no generation is starting")
        replaced, self.serving, self.starting = self.serving, self.starting, None
        self.completed = self.serving
        return replaced

    def abandon(self) -> int:
        """The starting generation failed; its number (its workers must go)."""
        if self.starting is None:
            raise GenerationError("no generation is starting")
        failed, self.starting = self.starting, None
        self.completed = max(self.completed, failed)  # numbers are never reused
        return failed

    def take_again(self) -> bool:
        """Was a reload asked for meanwhile?  Asking clears it."""
        again, self.again = self.again, False
        return again

    def is_live(self, generation: int) -> bool:
        """Does a worker of *generation* belong (and deserve a replacement)?"""
        return generation in (self.serving, self.starting)
