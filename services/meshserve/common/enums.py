"""The names users see for the proto's enums, derived from the enums themselves: one table each.

`PRIORITY_HIGH` is "high" on the CLI, in tenant files, in the OpenAI `priority` field and in metric
labels; `FINISH_REASON_LENGTH` is "length" in OpenAI responses, GenAI span attributes and the CLI.
"""

from __future__ import annotations

from meshserve.v1 import common_pb2


def _names(enum: object, prefix: str) -> dict[int, str]:
    return {
        value: name.removeprefix(prefix).lower()
        for name, value in enum.items()  # type: ignore[attr-defined]
        if not name.endswith("_UNSPECIFIED")
    }


# Served classes, most urgent first (CRITICAL = 1 ... BATCH = 5); UNSPECIFIED is served as NORMAL.
PRIORITY_NAMES: dict[int, str] = _names(common_pb2.Priority, "PRIORITY_")
PRIORITY_CLASSES: tuple[int, ...] = tuple(sorted(PRIORITY_NAMES))
PRIORITY_BY_NAME: dict[str, int] = {name: value for value, name in PRIORITY_NAMES.items()}
NUM_PRIORITY_VALUES = len(common_pb2.Priority.values())  # UNSPECIFIED included: index a list by the enum value

FINISH_REASON_NAMES: dict[int, str] = _names(common_pb2.FinishReason, "FINISH_REASON_")


def served_priority(priority: int) -> int:
    """The class a request is served in: UNSPECIFIED (and anything unknown) is NORMAL."""
    return priority if priority in PRIORITY_NAMES else common_pb2.PRIORITY_NORMAL


def priority_name(priority: int) -> str:
    """ "critical" ... "batch"; UNSPECIFIED is "normal", as it is served."""
    return PRIORITY_NAMES[served_priority(priority)]
