"""Errors about the user's input data, phrased so that the user can fix them."""

from __future__ import annotations

import os


class InputDataError(ValueError):
    """A problem with one input file: names the patient, the file and the problem.

    Args:
        problem: what is wrong, e.g. ``"contains 12 NaN voxels"``.
        path: the offending file, if there is one.
        patient_id: the patient the file belongs to, if known.
    """

    def __init__(self, problem: str, path: str | os.PathLike | None = None, patient_id: str | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.patient_id = patient_id
        parts = []
        if patient_id is not None:
            parts.append(f"patient {patient_id}")
        if self.path is not None:
            parts.append(f"file {self.path}")
        where = ", ".join(parts)
        super().__init__(f"{where}: {problem}" if where else problem)


class CohortValidationError(ValueError):
    """Several patients failed validation; ``errors`` holds one :class:`InputDataError` each."""

    def __init__(self, errors: list[InputDataError]):
        self.errors = list(errors)
        patients = sorted({str(e.patient_id) for e in self.errors})
        lines = [f"{len(self.errors)} problem(s) in {len(patients)} patient(s):"]
        lines += [f"  - {e}" for e in self.errors]
        super().__init__("\n".join(lines))
