"""Input problems said clearly at the project's entry points, whatever runs them.

:data:`INPUT_PROBLEMS` are the errors a user fixes (bad data, missing or unwritable places). The
``medsynth`` and ``python -m preprocessing`` command lines print them as one line. MONAI's
``python -m monai.bundle run`` wraps them in "Failed to evaluate ..." tracebacks of 60 lines, so the
functions that configs call (:func:`reports_input_problems`) log the problem as one clear line
first, then let it propagate unchanged.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["INPUT_PROBLEMS", "input_problem_in", "reports_input_problems"]

logger = logging.getLogger("medsynth")

INPUT_PROBLEMS: tuple[type[BaseException], ...] = (
    ValueError,
    FileNotFoundError,
    FileExistsError,
    NotADirectoryError,
    IsADirectoryError,
    PermissionError,
)

F = TypeVar("F", bound=Callable[..., Any])


def input_problem_in(error: BaseException) -> BaseException | None:
    """The first of :data:`INPUT_PROBLEMS` in ``error``'s cause chain, or ``None`` (MONAI's bundle
    runner wraps the project's errors in ``RuntimeError("Failed to evaluate ...")``)."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, INPUT_PROBLEMS):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def reports_input_problems(function: F) -> F:
    """Log an input problem raised by ``function`` as one ERROR line (once, at the innermost entry
    point that sees it), then re-raise it."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except INPUT_PROBLEMS as error:
            if not getattr(error, "_medsynth_reported", False):
                logger.error("%s", error)
                try:
                    error._medsynth_reported = True  # type: ignore[attr-defined]
                except AttributeError:
                    pass
            raise

    return wrapper  # type: ignore[return-value]
