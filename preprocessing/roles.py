"""Sequence roles from DICOM headers: which converted series is T1w, Gd-T1w, T2w, FLAIR or APTw.

The rules live in a mapping file (:data:`DEFAULT_ROLES_FILE`, whose ``about`` field documents the
condition language); a user's file (``preprocessing run --sequence-roles FILE``) is tried first, or
replaces the defaults with ``"replace_defaults": true``. Rules read the dcm2niix sidecar *before* it
is allow-listed (series descriptions are free text, needed here, kept out of every output): what
is recorded and logged is the series number, the role and the *rule's* name, never header text.

A series no rule matches is listed (number, sequence name, image type, timings), never given a
role by guess; when several series take one role, the ``prefer`` conditions and then the highest
series number decide, and the choice is logged and recorded with the series it beat.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from medsynth.constants import CLINICAL_SEQUENCES
from medsynth.errors import InputDataError

logger = logging.getLogger(__name__)

__all__ = ["DEFAULT_ROLES_FILE", "RoleAssignment", "RoleRules", "assign_roles", "load_role_rules"]

DEFAULT_ROLES_FILE = Path(__file__).with_name("sequence_roles.json")
# Fields an unmatched series is described by in messages: technical, never free text.
_DESCRIBING_FIELDS = ("SequenceName", "ImageType", "RepetitionTime", "EchoTime", "InversionTime")


@dataclass(frozen=True)
class RoleRules:
    """Ordered rules (``name``, ``role``, ``when``) and the tie-break conditions ``prefer``."""

    rules: tuple[Mapping[str, Any], ...]
    prefer: tuple[Mapping[str, Any], ...] = ()
    source: str = "default"


def _check_rules(rules: Sequence[Mapping[str, Any]], path: Path) -> None:
    for index, rule in enumerate(rules):
        where = f"rule {index + 1} ({rule.get('name', 'unnamed')})"
        role = rule.get("role", "missing")
        if role is not None and role not in CLINICAL_SEQUENCES:
            raise InputDataError(
                f"{where}: role {role!r} is not one of {', '.join(CLINICAL_SEQUENCES)} or null", path=path
            )
        if not isinstance(rule.get("when"), Mapping) or not rule["when"]:
            raise InputDataError(f"{where}: 'when' must be a non-empty object of conditions", path=path)
        for condition in rule["when"].values():
            if isinstance(condition, str):
                try:
                    re.compile(condition)
                except re.error as err:
                    raise InputDataError(f"{where}: bad regular expression: {err}", path=path) from None


def load_role_rules(path: str | os.PathLike | None = None) -> RoleRules:
    """The default rules, with a user's file (same form) tried first or replacing them."""

    def _read(file: Path) -> dict[str, Any]:
        try:
            content = json.loads(file.read_text())
        except FileNotFoundError:
            raise InputDataError("sequence-roles file does not exist", path=file) from None
        except json.JSONDecodeError as err:
            raise InputDataError(f"sequence-roles file is not valid JSON: {err}", path=file) from None
        if not isinstance(content, Mapping) or not isinstance(content.get("rules"), list):
            raise InputDataError("sequence-roles file needs a 'rules' list", path=file)
        _check_rules(content["rules"], file)
        return content

    defaults = _read(DEFAULT_ROLES_FILE)
    if path is None:
        return RoleRules(tuple(defaults["rules"]), tuple(defaults.get("prefer", ())))
    user = _read(Path(path))
    rules = list(user["rules"]) + ([] if user.get("replace_defaults") else list(defaults["rules"]))
    prefer = user.get("prefer", defaults.get("prefer", ()))
    return RoleRules(tuple(rules), tuple(prefer), source=str(path))


def _values(sidecar: Mapping[str, Any], field_names: str) -> list[Any]:
    return [sidecar[name] for name in field_names.split("|") if sidecar.get(name) not in (None, "", [])]


def _text(value: Any) -> str:
    return "\\".join(map(str, value)) if isinstance(value, list | tuple) else str(value)


def _holds(condition: Any, values: list[Any]) -> bool:
    if isinstance(condition, Mapping) and "present" in condition:
        return bool(values) == bool(condition["present"])
    if not values:
        return False
    if isinstance(condition, str):
        return any(re.search(condition, _text(v), re.IGNORECASE) for v in values)
    numbers = []
    for value in values:
        try:
            numbers.append(float(value))
        except (TypeError, ValueError):
            continue
    if isinstance(condition, Mapping):
        low, high = condition.get("min", float("-inf")), condition.get("max", float("inf"))
        return any(low <= n <= high for n in numbers)
    return any(n == float(condition) for n in numbers)


def _matches(when: Mapping[str, Any], sidecar: Mapping[str, Any]) -> bool:
    return all(_holds(condition, _values(sidecar, names)) for names, condition in when.items())


@dataclass
class RoleAssignment:
    """Roles of one exam's series, keyed by series file stem (e.g. ``series_5001``).

    Attributes:
        roles: sequence role -> chosen series stem.
        matched: every series stem -> ``(role or None, rule name)`` of the rule that matched.
        unmatched: series stems no rule matched, with their describing (non-free-text) fields.
        passed_over: role -> series stems that matched it but lost the tie-break.
    """

    roles: dict[str, str] = field(default_factory=dict)
    matched: dict[str, tuple[str | None, str]] = field(default_factory=dict)
    unmatched: dict[str, dict[str, Any]] = field(default_factory=dict)
    passed_over: dict[str, list[str]] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, content: Mapping[str, Any]) -> RoleAssignment:
        matched = {k: (v[0], v[1]) for k, v in content.get("matched", {}).items()}
        return cls(dict(content["roles"]), matched, dict(content["unmatched"]), dict(content["passed_over"]))


def _series_number(sidecar: Mapping[str, Any]) -> float:
    try:
        return float(sidecar.get("SeriesNumber", -1))
    except (TypeError, ValueError):
        return -1.0


def assign_roles(
    sidecars: Mapping[str, Mapping[str, Any]], rules: RoleRules | None = None, patient_id: str | None = None
) -> RoleAssignment:
    """Give each series (stem -> raw dcm2niix sidecar) a role by the first rule that matches.

    Returns:
        A :class:`RoleAssignment`; nothing is raised for unmatched series (they are listed in it and
        logged by number).
    """
    rules = rules or load_role_rules()
    result = RoleAssignment()
    candidates: dict[str, list[str]] = {}
    for stem, sidecar in sorted(sidecars.items()):
        rule = next((r for r in rules.rules if _matches(r["when"], sidecar)), None)
        if rule is None:
            result.unmatched[stem] = {k: sidecar[k] for k in _DESCRIBING_FIELDS if k in sidecar}
            continue
        result.matched[stem] = (rule["role"], str(rule.get("name", "unnamed")))
        if rule["role"] is not None:
            candidates.setdefault(rule["role"], []).append(stem)
    who = patient_id or "exam"
    for role, stems in candidates.items():

        def rank(stem: str) -> tuple:
            sidecar = sidecars[stem]
            return tuple(_matches(c, sidecar) for c in rules.prefer) + (_series_number(sidecar),)

        ordered = sorted(stems, key=rank, reverse=True)
        result.roles[role] = ordered[0]
        if len(ordered) > 1:
            result.passed_over[role] = ordered[1:]
            logger.info(
                "%s: %d series match %s (%s); took %s (prefer rules, then the latest series)",
                who,
                len(ordered),
                role,
                ", ".join(sorted(stems)),
                ordered[0],
            )
    for stem, described in result.unmatched.items():
        logger.warning(
            "%s: %s matches no sequence-role rule and is left out (%s); give it a role with "
            '--sequence-roles FILE, e.g. {"rules": [{"role": "t2w", "when": {"SeriesNumber": N}}]}',
            who,
            stem,
            ", ".join(f"{k} {v}" for k, v in described.items()) or "no describing field",
        )
    result.roles = {s: result.roles[s] for s in CLINICAL_SEQUENCES if s in result.roles}
    return result
