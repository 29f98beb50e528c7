"""Room name patterns such as `team:{team}`: parsing, checking and matching (no I/O).

A pattern is literal text with `{param}` parts. A parameter matches one or more characters
other than `:`, `/` and whitespace, so `team:{team}` matches `team:red` but not
`team:red:x`. Two parameters must be separated by literal text.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_ROOM_NAME_LENGTH = 256
PARAMETER_VALUE = r"[^:/\s]{1,128}"
_PARAMETER = re.compile(r"\{([^{}]*)\}")
_PARAMETER_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LITERAL_FORBIDDEN = re.compile(r"[{}\s]")


class PatternError(ValueError):
    """A room pattern of a manifest is not valid."""


@dataclass(frozen=True)
class RoomPattern:
    text: str
    params: tuple[str, ...]
    regex: re.Pattern[str]

    def match(self, room: str) -> dict[str, str] | None:
        """The parameters of `room` if it has this pattern's shape, else None."""
        found = self.regex.fullmatch(room)
        return found.groupdict() if found is not None else None


def parse_pattern(text: str) -> RoomPattern:
    """Compile a pattern; PatternError says what is wrong with it."""
    if not text:
        raise PatternError("a room pattern must not be empty")
    if len(text) > MAX_ROOM_NAME_LENGTH:
        raise PatternError(f"a room pattern must be at most {MAX_ROOM_NAME_LENGTH} characters")
    params: list[str] = []
    regex = ""
    position = 0
    for found in _PARAMETER.finditer(text):
        literal = text[position : found.start()]
        if not literal and params and position == found.start():
            raise PatternError(
                f"parameters {{{params[-1]}}} and {{{found.group(1)}}} must be separated by text"
            )
        regex += _literal(literal)
        name = found.group(1)
        if not _PARAMETER_NAME.fullmatch(name):
            raise PatternError(
                f"parameter {{{name}}}: names are letters, digits and _ (not starting with a digit)"
            )
        if name in params:
            raise PatternError(f"parameter {{{name}}} appears twice")
        params.append(name)
        regex += f"(?P<{name}>{PARAMETER_VALUE})"
        position = found.end()
    regex += _literal(text[position:])
    return RoomPattern(text, tuple(params), re.compile(regex))


def _literal(text: str) -> str:
    if _LITERAL_FORBIDDEN.search(text):
        raise PatternError("a room pattern may not contain whitespace or unpaired { }")
    return re.escape(text)


def valid_room_name(room: object) -> bool:
    return isinstance(room, str) and 0 < len(room) <= MAX_ROOM_NAME_LENGTH
