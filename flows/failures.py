"""Which step of an asset failed, and why in one line: read from the Prefect states of its tasks.

An asset's steps are a chain of task futures (flows.generate.submit_asset). When one fails, Prefect
ends the steps after it as NotReady (upstream not completed), so the first step in chain order
that did not complete is the one that failed; its state holds the exception. Importing this module
imports nothing heavy (the CLI catches StepFailed).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Optional


class StepFailed(Exception):
    """A step of the pipeline failed with an error that is not the user's (a bug, a crash, a
    timeout); the message is one line, the original error is the __cause__."""


@dataclass
class Failure:
    asset: str
    step: str
    reason: str  # one line
    error: Optional[BaseException] = None

    def record(self) -> dict:
        return {"asset": self.asset, "step": self.step, "reason": self.reason}

    def exception(self) -> BaseException:
        """What a flow of one asset raises: the user's error as it is (one line at the CLI, exit
        2), anything else as StepFailed naming the step (exit 1)."""
        from core.errors import Lift3DError

        if isinstance(self.error, Lift3DError):
            return self.error
        err = StepFailed(f"{self.step} failed: {self.reason}")
        err.__cause__ = self.error
        return err


def one_line(error: BaseException) -> str:
    """The first line of an error's message; the type's name too unless it is the user's error."""
    from core.errors import Lift3DError

    text = (str(error).strip().splitlines() or [""])[0]
    return text if isinstance(error, Lift3DError) else f"{type(error).__name__}: {text}".rstrip(": ")


def first_failure(asset: str, chain: Mapping[str, Any]) -> Optional[Failure]:
    """Wait for an asset's step futures ({step: future}, in chain order); the first step that did not
    complete, with its one-line reason, or None when every step completed (or was cached)."""
    for step, future in chain.items():
        future.wait()
        state = future.state
        if state.is_completed():
            continue
        error = None
        if state.is_failed() or state.is_crashed() or state.is_cancelled():
            try:
                got = state.result(raise_on_failure=False)
                error = got if isinstance(got, BaseException) else None
            except Exception:  # noqa: BLE001 - the state's message still says what happened
                error = None
        reason = one_line(error) if error is not None else f"{state.name}: {state.message or 'no message'}"
        return Failure(asset, step, reason, error)
    return None
