"""MongoDB query matching on documents, in process, limited to a whitelist of operators.

A binding's ``filter`` and ``scope`` and a client's subscribe filter are evaluated on every
change event without a round trip to the database, so this module must agree with MongoDB's
``find`` on every operator it accepts:

- a path looks through embedded documents and through arrays (into each subdocument, and at a
  numeric index such as ``"items.0.sku"``); a field equal to an array matches when the whole
  array or any element equals the value;
- a missing field equals ``null``; ``$ne`` and ``$nin`` are the negation of ``$eq`` and ``$in``,
  so they match missing fields;
- values compare as BSON values: numbers of every kind compare by value, other types only
  within their own type (a boolean is not a number, a string never compares with a number),
  and embedded documents are equal only with the same fields in the same order.

Only the operators in ``ALLOWED_OPERATORS`` are accepted. Anything else (``$where``,
``$expr``, ``$function``, ``$text``, ...) is refused with a ``QueryError`` naming the place in
the query, as are malformed arguments, regular expressions Python cannot compile, patterns
longer than ``MAX_REGEX_LENGTH`` and patterns with nested repetition (see
``_may_backtrack``), which can take exponential time on a crafted string.

Compile once with ``compile_query`` and call the ``Matcher`` per document: validation, regex
compilation and dispatch happen at compile time only.
"""

from __future__ import annotations

import calendar
import datetime
import enum
import operator
import re
import uuid
import warnings
from collections.abc import Callable, Hashable, Iterable, Iterator, Mapping, Sequence
from decimal import Decimal
from re import _constants as _sre_constants  # type: ignore[attr-defined]
from re import _parser as _sre_parser  # type: ignore[attr-defined]
from types import MappingProxyType
from typing import Any, Final

from bson import SON, Binary, Code, DBRef, Decimal128, Int64, MaxKey, MinKey, ObjectId, Regex
from bson.datetime_ms import DatetimeMS
from bson.timestamp import Timestamp

__all__ = [
    "ALLOWED_OPERATORS",
    "MAX_QUERY_DEPTH",
    "MAX_REGEX_LENGTH",
    "PLACEHOLDER_PATTERN",
    "ROOM_PLACEHOLDER_PATTERN",
    "Matcher",
    "QueryError",
    "compile_query",
    "conjunction",
    "is_operator_document",
    "is_regex",
    "matches",
    "path_reader",
    "placeholders_in",
    "substitute_placeholders",
    "validate_query",
    "value_key",
]

# In the order the error message lists them.
_OPERATOR_ORDER: Final = (
    "$eq",
    "$ne",
    "$gt",
    "$gte",
    "$lt",
    "$lte",
    "$in",
    "$nin",
    "$exists",
    "$and",
    "$or",
    "$nor",
    "$not",
    "$all",
    "$size",
    "$elemMatch",
    "$regex",
)
ALLOWED_OPERATORS: Final = frozenset(_OPERATOR_ORDER)
_LOGICAL_OPERATORS: Final = frozenset({"$and", "$or", "$nor"})
_FIELD_OPERATORS: Final = (ALLOWED_OPERATORS - _LOGICAL_OPERATORS) | {"$options"}

MAX_REGEX_LENGTH: Final = 1000
# Objects and arrays nested deeper than this are refused, as MongoDB refuses deep BSON.
MAX_QUERY_DEPTH: Final = 100

# Claim names as providers write them: `org_id`, `realm_access.roles`, `cognito:groups`,
# `https://example.com/roles`.
PLACEHOLDER_PATTERN: Final = re.compile(r"\$(?:user\.(?:id|email)|claims\.[A-Za-z0-9_.:/-]+)\Z")
_PLACEHOLDER_PREFIXES: Final = ("$user.", "$claims.")
# Room join rules (SPEC 11) may also compare with the room's parameters: $room.<param>.
ROOM_PLACEHOLDER_PATTERN: Final = re.compile(
    r"\$(?:user\.(?:id|email)|claims\.[A-Za-z0-9_.-]+|room\.[A-Za-z_][A-Za-z0-9_]*)\Z"
)
_ROOM_PLACEHOLDER_PREFIXES: Final = (*_PLACEHOLDER_PREFIXES, "$room.")

# A document with these keys is a DBRef, compared as a value rather than read as operators.
_DBREF_KEYS: Final = frozenset({"$ref", "$id", "$db"})

Predicate = Callable[[Any], bool]


class QueryError(ValueError):
    """A query that is malformed or uses a forbidden operator."""

    def __init__(self, message: str, path: str = "") -> None:
        self.path = path
        self.message = message
        super().__init__(f"{path}: {message}" if path else message)


def _forbidden(op: str, path: str) -> QueryError:
    allowed = ", ".join(_OPERATOR_ORDER)
    return QueryError(f"operator {op} is not allowed (allowed: {allowed})", path)


# ---------------------------------------------------------------------------------------------
# BSON values: type order, comparison, equality keys
# ---------------------------------------------------------------------------------------------


class _Missing:
    """The value of a field a document does not have."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<missing>"


_MISSING: Final = _Missing()

# MongoDB's canonical type order: values of different ranks never compare equal.
_MIN_KEY, _ABSENT, _NULL, _NUMBER, _STRING, _OBJECT, _ARRAY = -1, 0, 5, 10, 15, 20, 25
_BINARY, _OBJECT_ID, _BOOL, _DATE, _TIMESTAMP, _REGEX = 30, 35, 40, 45, 47, 50
_CODE, _CODE_WITH_SCOPE, _MAX_KEY, _UNKNOWN = 60, 65, 100, 1000

_RANK_BY_TYPE: Final[dict[type, int]] = {
    _Missing: _ABSENT,
    type(None): _NULL,
    bool: _BOOL,
    int: _NUMBER,
    Int64: _NUMBER,
    float: _NUMBER,
    Decimal128: _NUMBER,
    str: _STRING,
    dict: _OBJECT,
    SON: _OBJECT,
    DBRef: _OBJECT,
    list: _ARRAY,
    tuple: _ARRAY,
    bytes: _BINARY,
    Binary: _BINARY,
    uuid.UUID: _BINARY,
    ObjectId: _OBJECT_ID,
    datetime.datetime: _DATE,
    DatetimeMS: _DATE,
    Timestamp: _TIMESTAMP,
    Regex: _REGEX,
    re.Pattern: _REGEX,
    MinKey: _MIN_KEY,
    MaxKey: _MAX_KEY,
}
_SUBCLASS_RANKS: Final = (
    (int, _NUMBER),
    (float, _NUMBER),
    (str, _STRING),
    (Mapping, _OBJECT),
    (list, _ARRAY),
    (tuple, _ARRAY),
    (bytes, _BINARY),
    (datetime.datetime, _DATE),
)
_ARRAYS: Final = (list, tuple)
# Types whose Python equality is MongoDB's equality between two values of that same type.
_PLAIN_TYPES: Final = frozenset({str, int, float, bool, ObjectId})


def _rank(value: Any) -> int:
    rank = _RANK_BY_TYPE.get(type(value))
    return rank if rank is not None else _rank_of_subclass(value)


def _rank_of_subclass(value: Any) -> int:
    # Code is a str subclass but a type of its own in BSON.
    if isinstance(value, Code):
        return _CODE if value.scope is None else _CODE_WITH_SCOPE
    for kind, rank in _SUBCLASS_RANKS:
        if isinstance(value, kind):
            return rank
    return _UNKNOWN


def _cmp(left: Any, right: Any) -> int:
    return (left > right) - (left < right)


def _number(value: Any) -> int | float | Decimal:
    return value.to_decimal() if isinstance(value, Decimal128) else value


def _is_nan(number: int | float | Decimal) -> bool:
    if isinstance(number, float):
        return number != number
    return isinstance(number, Decimal) and number.is_nan()


def _compare_numbers(left: Any, right: Any) -> int:
    # NaN equals NaN and sorts before every other number.
    x, y = _number(left), _number(right)
    x_nan, y_nan = _is_nan(x), _is_nan(y)
    if x_nan or y_nan:
        return int(y_nan) - int(x_nan)
    return _cmp(x, y)


def _date_ms(value: datetime.datetime | DatetimeMS) -> int:
    # Milliseconds since the epoch, as BSON stores dates; naive datetimes are UTC.
    if isinstance(value, DatetimeMS):
        return int(value)
    offset = value.utcoffset()
    if offset is not None:
        value = value - offset
    return calendar.timegm(value.timetuple()) * 1000 + value.microsecond // 1000


def _binary_key(value: bytes | uuid.UUID) -> tuple[int, int, bytes]:
    # BSON orders binary data by length, then subtype, then bytes.
    if isinstance(value, uuid.UUID):
        data, subtype = value.bytes, 4
    else:
        data, subtype = bytes(value), value.subtype if isinstance(value, Binary) else 0
    return (len(data), subtype, data)


_FLAG_ORDER: Final = "ilmsux"
_FLAG_BITS: Final = {
    "i": re.IGNORECASE,
    "l": re.LOCALE,
    "m": re.MULTILINE,
    "s": re.DOTALL,
    "u": re.UNICODE,
    "x": re.VERBOSE,
}
_KNOWN_FLAG_BITS: Final = sum(_FLAG_BITS.values())


def _flag_letters(bits: int) -> str:
    return "".join(letter for letter in _FLAG_ORDER if bits & _FLAG_BITS[letter])


def _canonical_flags(letters: str) -> str:
    return "".join(letter for letter in _FLAG_ORDER if letter in letters)


def _regex_key(value: Regex[Any] | re.Pattern[Any]) -> tuple[str, str]:
    pattern = value.pattern
    text = pattern.decode("utf-8", "replace") if isinstance(pattern, bytes) else pattern
    return (text, _flag_letters(value.flags))


def _items(value: Any) -> list[tuple[Any, Any]]:
    document = value.as_doc() if isinstance(value, DBRef) else value
    return list(document.items())


def _compare_documents(left: Any, right: Any) -> int:
    # Field by field in order: type, then name, then value; a prefix sorts first.
    left_items, right_items = _items(left), _items(right)
    for (left_key, left_value), (right_key, right_value) in zip(
        left_items, right_items, strict=False
    ):
        left_rank, right_rank = _rank(left_value), _rank(right_value)
        if left_rank != right_rank:
            return -1 if left_rank < right_rank else 1
        if left_key != right_key:
            return -1 if left_key < right_key else 1
        result = _compare_same_rank(left_value, right_value, left_rank)
        if result:
            return result
    return _cmp(len(left_items), len(right_items))


def _compare_arrays(left: Any, right: Any) -> int:
    for left_value, right_value in zip(left, right, strict=False):
        result = _compare(left_value, right_value)
        if result:
            return result
    return _cmp(len(left), len(right))


def _compare_code_with_scope(left: Code, right: Code) -> int:
    return _cmp(str(left), str(right)) or _compare_documents(left.scope, right.scope)


def _compare_unknown(left: Any, right: Any) -> int:
    return 0 if left == right else -1


_SAME_RANK_COMPARE: Final[dict[int, Callable[[Any, Any], int]]] = {
    _NUMBER: _compare_numbers,
    _STRING: _cmp,
    _OBJECT: _compare_documents,
    _ARRAY: _compare_arrays,
    _BINARY: lambda left, right: _cmp(_binary_key(left), _binary_key(right)),
    _OBJECT_ID: lambda left, right: _cmp(left.binary, right.binary),
    _BOOL: _cmp,
    _DATE: lambda left, right: _cmp(_date_ms(left), _date_ms(right)),
    _TIMESTAMP: lambda left, right: _cmp((left.time, left.inc), (right.time, right.inc)),
    _REGEX: lambda left, right: _cmp(_regex_key(left), _regex_key(right)),
    _CODE: lambda left, right: _cmp(str(left), str(right)),
    _CODE_WITH_SCOPE: _compare_code_with_scope,
    _UNKNOWN: _compare_unknown,
}


def _compare_same_rank(left: Any, right: Any, rank: int) -> int:
    compare = _SAME_RANK_COMPARE.get(rank)
    # Null, missing, MinKey and MaxKey have a single value each.
    return compare(left, right) if compare is not None else 0


def _compare(left: Any, right: Any) -> int:
    left_rank, right_rank = _rank(left), _rank(right)
    if left_rank != right_rank:
        return -1 if left_rank < right_rank else 1
    return _compare_same_rank(left, right, left_rank)


def _equal(left: Any, right: Any) -> bool:
    rank = _rank(left)
    return rank == _rank(right) and _compare_same_rank(left, right, rank) == 0


def _number_key(value: Any) -> Hashable:
    # int, float and Decimal hash alike when equal, so 1, 1.0 and Decimal128("1") meet.
    number = _number(value)
    return (_NUMBER, "nan") if _is_nan(number) else (_NUMBER, number)


_KEY_MAKERS: Final[dict[int, Callable[[Any], Hashable]]] = {
    _NUMBER: _number_key,
    _STRING: lambda value: (_STRING, value),
    _BINARY: lambda value: (_BINARY, *_binary_key(value)),
    _OBJECT_ID: lambda value: (_OBJECT_ID, value),
    _BOOL: lambda value: (_BOOL, value),
    _DATE: lambda value: (_DATE, _date_ms(value)),
    _TIMESTAMP: lambda value: (_TIMESTAMP, value.time, value.inc),
    _REGEX: lambda value: (_REGEX, *_regex_key(value)),
    _CODE: lambda value: (_CODE, str(value)),
}
_SINGLE_VALUE_RANKS: Final = frozenset({_MIN_KEY, _ABSENT, _NULL, _MAX_KEY})


def _hash_key(value: Any) -> Hashable | None:
    """A key equal for exactly the values MongoDB finds equal, or None (documents, arrays)."""
    rank = _rank(value)
    make = _KEY_MAKERS.get(rank)
    if make is not None:
        return make(value)
    return (rank,) if rank in _SINGLE_VALUE_RANKS else None


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------


def _array_index(part: str) -> int | None:
    # MongoDB compares the part with the element's name, so "01" selects nothing.
    if part.isascii() and part.isdigit() and (part == "0" or part[0] != "0"):
        return int(part)
    return None


def _as_document(value: Any) -> Mapping[str, Any] | None:
    if type(value) is dict:
        return value
    if isinstance(value, DBRef):
        return value.as_doc()
    return value if isinstance(value, Mapping) else None


class _FieldPath:
    """A dotted path, resolved the way MongoDB resolves it through documents and arrays."""

    __slots__ = ("indexes", "parts")

    def __init__(self, dotted: str) -> None:
        self.parts = tuple(dotted.split("."))
        self.indexes = tuple(_array_index(part) for part in self.parts)

    def values(self, value: Any, start: int, expand_leaf: bool) -> Iterator[Any]:
        """Every value the path reaches from `value`, `_MISSING` where a field is absent."""
        for position in range(start, len(self.parts)):
            if isinstance(value, _ARRAYS):
                yield from self._array_values(value, position, expand_leaf)
                return
            document = _as_document(value)
            value = _MISSING if document is None else document.get(self.parts[position], _MISSING)
        # A leaf array offers its elements, then itself (for equality with the whole array).
        if expand_leaf and isinstance(value, _ARRAYS):
            yield from value
        yield value

    def _array_values(self, array: Any, position: int, expand_leaf: bool) -> Iterator[Any]:
        # The rest of the path applies to each subdocument; a numeric part also selects the
        # element at that index. Arrays nested in arrays are only entered through an index.
        index = self.indexes[position]
        last = position + 1 == len(self.parts)
        for offset, element in enumerate(array):
            document = _as_document(element)
            if document is not None:
                yield from self.values(document, position, expand_leaf)
            if offset != index:
                continue
            if last:
                yield element
            elif document is not None:
                yield from self.values(document, position + 1, expand_leaf)
            elif isinstance(element, _ARRAYS):
                yield from self._array_values(element, position + 1, expand_leaf)


def _path_predicate(dotted: str, test: Predicate, expand_leaf: bool) -> Predicate:
    """A document predicate: does any value at `dotted` pass `test`?"""
    path = _FieldPath(dotted)
    parts = path.parts

    def match(document: Any) -> bool:
        value = document
        for part in parts:
            # Fast path through plain subdocuments; anything else takes the general walk.
            if type(value) is not dict:
                return any(map(test, path.values(document, 0, expand_leaf)))
            value = value.get(part, _MISSING)
        if expand_leaf and isinstance(value, _ARRAYS) and any(map(test, value)):
            return True
        return test(value)

    return match


# ---------------------------------------------------------------------------------------------
# Tests on single values, and how they combine
# ---------------------------------------------------------------------------------------------


def _always(_value: Any) -> bool:
    return True


def _never(_value: Any) -> bool:
    return False


def _is_null_or_missing(value: Any) -> bool:
    return value is None or value is _MISSING


def _is_present(value: Any) -> bool:
    return value is not _MISSING


def _negate(predicate: Predicate) -> Predicate:
    def negated(value: Any) -> bool:
        return not predicate(value)

    return negated


def _all_of(predicates: list[Predicate]) -> Predicate:
    # A balanced tree of pairs: no generator per call, and depth stays logarithmic even for a
    # filter with thousands of clauses.
    if not predicates:
        return _always
    if len(predicates) == 1:
        return predicates[0]
    middle = len(predicates) // 2
    first, second = _all_of(predicates[:middle]), _all_of(predicates[middle:])

    def both(value: Any) -> bool:
        return first(value) and second(value)

    return both


def _any_of(predicates: list[Predicate]) -> Predicate:
    if not predicates:
        return _never
    if len(predicates) == 1:
        return predicates[0]
    middle = len(predicates) // 2
    first, second = _any_of(predicates[:middle]), _any_of(predicates[middle:])

    def either(value: Any) -> bool:
        return first(value) or second(value)

    return either


def _none_of(predicates: list[Predicate]) -> Predicate:
    return _negate(_any_of(predicates))


_COMBINATORS: Final[dict[str, Callable[[list[Predicate]], Predicate]]] = {
    "$and": _all_of,
    "$or": _any_of,
    "$nor": _none_of,
}


def _equals(expected: Any) -> Predicate:
    if expected is None:
        return _is_null_or_missing
    key = _hash_key(expected)
    if key is None:
        rank = _rank(expected)
        return lambda value: _rank(value) == rank and _compare_same_rank(value, expected, rank) == 0
    kind = type(expected)
    if kind in _PLAIN_TYPES and expected == expected:
        # Same plain type: Python's == is MongoDB's equality (NaN goes through its key).
        return lambda value: value == expected if type(value) is kind else _hash_key(value) == key
    return lambda value: _hash_key(value) == key


def _membership(values: list[Any], patterns: list[Predicate]) -> Predicate:
    has_null = any(value is None for value in values)
    strings = {str(value) for value in values if _rank(value) == _STRING}
    keys: set[Hashable] = set()
    others: list[Any] = []
    for value in values:
        key = _hash_key(value)
        if key is None:
            others.append(value)
        else:
            keys.add(key)

    def is_member(value: Any) -> bool:
        if type(value) is str and value in strings:
            return True
        if value is None or value is _MISSING:
            return has_null
        key = _hash_key(value)
        if key is not None:
            if key in keys:
                return True
        elif any(_equal(value, other) for other in others):
            return True
        return any(pattern(value) for pattern in patterns)

    return is_member


_ORDER_TESTS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$lt": operator.lt,
    "$lte": operator.le,
}


def _ordering(op: str, bound: Any) -> Predicate:
    rank = _rank(bound)
    if rank in (_MIN_KEY, _MAX_KEY):
        return _key_bound_ordering(op, rank)
    if rank == _NUMBER:
        return _number_ordering(op, _number(bound))
    test = _ORDER_TESTS[op]
    inclusive = op in ("$gte", "$lte")

    def in_order(value: Any) -> bool:
        value_rank = _rank(value)
        if value_rank != rank:
            # Values of other types never compare, except that missing counts as null.
            return inclusive and rank == _NULL and value_rank == _ABSENT
        return test(_compare_same_rank(value, bound, rank), 0)

    return in_order


def _number_ordering(op: str, bound: int | float | Decimal) -> Predicate:
    test = _ORDER_TESTS[op]
    if _is_nan(bound):
        # NaN is only "equal" to NaN: $gte/$lte NaN match NaN, $gt/$lt NaN match nothing.
        if op in ("$gt", "$lt"):
            return _never
        return lambda value: _rank(value) == _NUMBER and _is_nan(_number(value))

    def in_order(value: Any) -> bool:
        kind = type(value)
        if kind is int:
            return test(value, bound)
        if kind is float:
            return value == value and test(value, bound)
        if _rank(value) != _NUMBER:
            return False
        number = _number(value)
        return not _is_nan(number) and test(number, bound)

    return in_order


def _key_bound_ordering(op: str, rank: int) -> Predicate:
    # Everything sorts after MinKey and before MaxKey, including missing fields.
    inclusive = op in ("$gte", "$lte")
    above = op in ("$gt", "$gte")
    beyond = above if rank == _MIN_KEY else not above

    def in_order(value: Any) -> bool:
        return inclusive if _rank(value) == rank else beyond

    return in_order


def _has_size(size: int) -> Predicate:
    return lambda value: isinstance(value, _ARRAYS) and len(value) == size


def _array_as_document(array: Any) -> dict[str, Any]:
    return {str(index): element for index, element in enumerate(array)}


def _some_element(test: Predicate) -> Predicate:
    """$elemMatch on values: some element of the array passes every operator."""

    def some_element(value: Any) -> bool:
        return isinstance(value, _ARRAYS) and any(map(test, value))

    return some_element


def _some_subdocument(query: Predicate) -> Predicate:
    """$elemMatch with a query: some element, a document (or an array), matches the query."""

    def matches_element(element: Any) -> bool:
        document = _as_document(element)
        if document is None and isinstance(element, _ARRAYS):
            document = _array_as_document(element)
        return document is not None and query(document)

    def some_subdocument(value: Any) -> bool:
        return isinstance(value, _ARRAYS) and any(map(matches_element, value))

    return some_subdocument


def _leaf(test: Predicate, field: str | None, *, expand_leaf: bool = True) -> Predicate:
    # Without a field the test applies to the value itself ($elemMatch on values).
    return test if field is None else _path_predicate(field, test, expand_leaf)


def _true_value(value: Any) -> bool:
    # MongoDB's truthiness for $exists: null, false and zero are false, anything else true.
    if value is None or isinstance(value, bool):
        return bool(value)
    if isinstance(value, int | float):
        return value != 0
    if isinstance(value, Decimal128):
        return not value.to_decimal().is_zero()
    return True


def _whole_number(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


# ---------------------------------------------------------------------------------------------
# Regular expressions
# ---------------------------------------------------------------------------------------------

_QUERY_FLAGS: Final = frozenset("imsx")
_REPEAT_CODES: Final = (
    _sre_constants.MAX_REPEAT,
    _sre_constants.MIN_REPEAT,
    _sre_constants.POSSESSIVE_REPEAT,
)


def _is_regex(value: Any) -> bool:
    return isinstance(value, Regex | re.Pattern)


def _regex_source(value: Any, path: str) -> tuple[str, str]:
    """Pattern text and flag letters of a $regex value: a string or a regular expression."""
    if isinstance(value, str):
        return value, ""
    if not _is_regex(value):
        raise QueryError("$regex needs a string or a regular expression", path)
    if not isinstance(value.pattern, str):
        raise QueryError("a regular expression must be text, not bytes", path)
    letters = _flag_letters(value.flags)
    if value.flags & ~_KNOWN_FLAG_BITS or "l" in letters:
        raise QueryError("regular expression flags must be among i, m, s and x", path)
    return value.pattern, letters


def _compile_regex(source: str, letters: str, path: str) -> re.Pattern[str]:
    if len(source) > MAX_REGEX_LENGTH:
        raise QueryError(f"regular expression longer than {MAX_REGEX_LENGTH} characters", path)
    if "\0" in source:
        raise QueryError("regular expression cannot contain a null character", path)
    # "u" needs no flag: Python matches text patterns with Unicode rules already.
    flags = 0
    for letter in letters.replace("u", ""):
        flags |= _FLAG_BITS[letter]
    try:
        # A client's pattern must neither print warnings nor fail with another exception.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            compiled = re.compile(source, flags)
            parsed = _sre_parser.parse(source, flags)
    except (re.error, OverflowError, RecursionError, ValueError) as exc:
        raise QueryError(f"invalid regular expression: {exc}", path) from None
    try:
        may_backtrack = _may_backtrack(parsed)
    except RecursionError:
        raise QueryError("regular expression is nested too deeply", path) from None
    if may_backtrack:
        raise QueryError(
            "regular expression can take exponential or high polynomial time: it repeats a "
            "part that itself varies, like (a+)+, (a?){30} or (.*,){20}, has alternatives "
            "starting with the same character inside a repetition, like (a|ab)*, has more "
            f"than {MAX_UNBOUNDED_REPEATS} unbounded repeats (.*.*.*.*) or a back-reference; "
            "write it without these",
            path,
        )
    return compiled


def _regex_test(source: str, letters: str, path: str) -> Predicate:
    """Matches strings the pattern finds, and regular expression values equal to it."""
    search = _compile_regex(source, letters, path).search
    key = (source, _canonical_flags(letters))

    def matches_regex(value: Any) -> bool:
        if type(value) is str:
            return search(value) is not None
        rank = _rank(value)
        if rank == _STRING:
            return search(value) is not None
        return rank == _REGEX and _regex_key(value) == key

    return matches_regex


def _regex_value_test(value: Any, path: str) -> Predicate:
    source, letters = _regex_source(value, path)
    return _regex_test(source, letters, path)


def _may_backtrack(parsed: Any) -> bool:
    """Whether a pattern has the shape of those known to backtrack catastrophically.

    The check is deliberately simple: it refuses a repeated group (``*``, ``+``, ``{n,}``,
    ``{n,m}``) whose body contains another variable repetition, like ``(a+)+``, ``(a*)*`` or
    ``(\\w+\\s?)*``, or an alternation whose branches do not start with distinct literal
    characters, like ``(a|a)*`` or ``(a|ab)*``. It also refuses some harmless patterns such
    as ``(,\\d+)*``; those can be written without the nesting.
    """
    ignore_case = bool(parsed.state.flags & re.IGNORECASE)
    if _nested_repetition(parsed, repeated=False, ignore_case=ignore_case):
        return True
    # Several unbounded repeats in a row (.*.*.*.*) cost a power of the length per start;
    # back-references repeated defeat every shortcut of the matcher.
    return _overlapping_unbounded(parsed, ignore_case) > MAX_UNBOUNDED_REPEATS or (
        _has_backreference(parsed)
    )


MAX_UNBOUNDED_REPEATS = 2


def _walk(items: Any) -> Iterator[tuple[Any, Any]]:
    for code, argument in items:
        yield code, argument
        if code in _REPEAT_CODES:
            yield from _walk(argument[2])
            continue
        for sub_pattern in _sub_patterns(argument):
            yield from _walk(sub_pattern)


def _overlapping_unbounded(parsed: Any, ignore_case: bool) -> int:
    """The most unbounded repeats that can match the same character: repeats of one literal
    (a*a*a*) and of anything wider (.*, \\w+, [a-z]*), which overlaps every other one.
    Repeats of different literals (a+b+c*) cannot compete for a character."""
    broad = 0
    literals: dict[str, int] = {}
    for code, argument in _walk(parsed):
        if code not in _REPEAT_CODES or argument[1] != _sre_constants.MAXREPEAT:
            continue
        body = list(argument[2])
        if len(body) == 1 and body[0][0] == _sre_constants.LITERAL:
            character = chr(body[0][1])
            key = character.casefold() if ignore_case else character
            literals[key] = literals.get(key, 0) + 1
        else:
            broad += 1
    return broad + max(literals.values(), default=0)


def _has_backreference(parsed: Any) -> bool:
    references = (_sre_constants.GROUPREF, _sre_constants.GROUPREF_EXISTS)
    return any(code in references for code, _argument in _walk(parsed))


def _nested_repetition(items: Any, *, repeated: bool, ignore_case: bool) -> bool:
    for code, argument in items:
        if code in _REPEAT_CODES:
            low, high, body = argument
            if repeated and high != low:  # a variable part inside any repetition: (a?){30}
                return True
            if _nested_repetition(body, repeated=repeated or high > 1, ignore_case=ignore_case):
                return True
            continue
        is_branch = code == _sre_constants.BRANCH
        if is_branch and repeated and _branches_overlap(argument[1], ignore_case):
            return True
        for sub_pattern in _sub_patterns(argument):
            if _nested_repetition(sub_pattern, repeated=repeated, ignore_case=ignore_case):
                return True
    return False


def _sub_patterns(argument: Any) -> list[Any]:
    if isinstance(argument, _sre_parser.SubPattern):
        return [argument]
    if isinstance(argument, tuple | list):
        return [found for item in argument for found in _sub_patterns(item)]
    return []


def _branches_overlap(branches: list[Any], ignore_case: bool) -> bool:
    seen: set[str] = set()
    for branch in branches:
        first = _first_literal(branch, ignore_case)
        if first is None or first in seen:
            return True
        seen.add(first)
    return False


def _first_literal(branch: Any, ignore_case: bool) -> str | None:
    if not len(branch):
        return None
    code, argument = branch[0]
    if code != _sre_constants.LITERAL:
        return None
    character = chr(argument)
    return character.casefold() if ignore_case else character


# ---------------------------------------------------------------------------------------------
# Validation and compilation
# ---------------------------------------------------------------------------------------------


def _check_depth(query: object) -> None:
    """Refuse absurdly nested queries up front, without recursion, so later walks are safe."""
    stack: list[tuple[object, int]] = [(query, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_QUERY_DEPTH:
            raise QueryError(f"query is nested more than {MAX_QUERY_DEPTH} levels deep")
        if isinstance(value, Mapping):
            stack.extend((item, depth + 1) for item in value.values())
        elif isinstance(value, _ARRAYS):
            stack.extend((item, depth + 1) for item in value)


class _Placeholders(enum.Enum):
    """How a query's string values that look like placeholders are treated."""

    REJECT = "reject"  # validate_query: an error, placeholders belong in a scope
    ALLOW = "allow"  # validate_query(allow_placeholders=True): valid ones are fine
    LITERAL = "literal"  # compile_query: values are data, already substituted


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(value: Any) -> str:
    names = {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}
    if type(value) in names:
        return names[type(value)]
    return "number" if isinstance(value, int | float) else type(value).__name__


def _is_operator_document(value: Any) -> bool:
    if not isinstance(value, Mapping) or not value:
        return False
    first = next(iter(value))
    is_dbref = "$ref" in value and "$id" in value
    return isinstance(first, str) and first.startswith("$") and not is_dbref


def _is_elem_match_entry(value: Any) -> bool:
    return isinstance(value, Mapping) and len(value) == 1 and "$elemMatch" in value


def _is_elem_match_on_values(argument: Mapping[str, Any]) -> bool:
    # {"$gt": 1} tests the elements themselves; {"qty": ...} or {"$or": ...} tests subdocuments.
    first = next(iter(argument), None)
    return isinstance(first, str) and first.startswith("$") and first not in _LOGICAL_OPERATORS


class _Compiler:
    """Validates a query and builds its predicate in one walk, so errors carry their path."""

    def __init__(self, placeholders: _Placeholders, *, room: bool = False) -> None:
        self._placeholders = placeholders
        self._pattern = ROOM_PLACEHOLDER_PATTERN if room else PLACEHOLDER_PATTERN
        self._prefixes = _ROOM_PLACEHOLDER_PREFIXES if room else _PLACEHOLDER_PREFIXES
        self._known = "$user.id, $user.email, $claims.<name>" + (
            " or $room.<param>" if room else ""
        )
        self._handlers: dict[str, Callable[[str, Any, str | None, str], Predicate]] = {
            "$eq": self._eq,
            "$ne": self._ne,
            "$gt": self._order,
            "$gte": self._order,
            "$lt": self._order,
            "$lte": self._order,
            "$in": self._in,
            "$nin": self._nin,
            "$exists": self._exists,
            "$size": self._size,
            "$all": self._all,
            "$elemMatch": self._elem_match,
            "$not": self._not,
        }

    def query(self, query: object, path: str) -> Predicate:
        if not isinstance(query, Mapping):
            raise QueryError(f"a query must be an object, not {_type_name(query)}", path)
        clauses = [self._clause(key, value, _join(path, str(key))) for key, value in query.items()]
        return _all_of(clauses)

    def _clause(self, key: object, value: Any, path: str) -> Predicate:
        if not isinstance(key, str):
            raise QueryError(f"field names must be strings, not {_type_name(key)}", path)
        if key.startswith("$"):
            return self._logical(key, value, path)
        return self._field(key, value, path)

    def _logical(self, op: str, value: Any, path: str) -> Predicate:
        if op not in _LOGICAL_OPERATORS:
            if op in _FIELD_OPERATORS:
                example = f'{{"age": {{"{op}": ...}}}}'
                raise QueryError(f"{op} must be applied to a field, e.g. {example}", path)
            raise _forbidden(op, path)
        if not isinstance(value, _ARRAYS) or not value:
            raise QueryError(f"{op} needs a non-empty array of query objects", path)
        branches = []
        for index, item in enumerate(value):
            item_path = f"{path}[{index}]"
            if not isinstance(item, Mapping):
                message = f"each entry of {op} must be a query object, not {_type_name(item)}"
                raise QueryError(message, item_path)
            branches.append(self.query(item, item_path))
        return _COMBINATORS[op](branches)

    def _field(self, field: str, value: Any, path: str) -> Predicate:
        if "" in field.split("."):
            raise QueryError(f"field path {field!r} has an empty part", path)
        if _is_operator_document(value):
            return self._operators(value, field, path)
        if _is_regex(value):
            return _leaf(_regex_value_test(value, path), field)
        self._check_literal(value, path)
        return _leaf(_equals(value), field)

    def _operators(self, spec: Mapping[str, Any], field: str | None, path: str) -> Predicate:
        """The operators of one field, e.g. {"$gt": 1, "$lt": 5}; all of them must hold."""
        predicates = []
        for op, argument in spec.items():
            op_path = _join(path, str(op))
            if not isinstance(op, str) or not op.startswith("$"):
                message = (
                    f"cannot mix operators with the field name {op!r}; "
                    'use a dotted path such as {"a.b": {"$gt": 1}} for a subfield'
                )
                raise QueryError(message, op_path)
            if op == "$regex":
                predicates.append(self._regex(spec, field, path))
            elif op == "$options":
                if "$regex" not in spec:
                    raise QueryError("$options is only valid beside $regex", op_path)
            else:
                predicates.append(self._operator(op, argument, field, op_path))
        return _all_of(predicates)

    def _operator(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        handler = self._handlers.get(op)
        if handler is not None:
            return handler(op, argument, field, path)
        if op in _LOGICAL_OPERATORS:
            message = f"{op} belongs at the top level of a query (or of an $elemMatch)"
            raise QueryError(message, path)
        raise _forbidden(op, path)

    def _eq(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        # $eq compares literally, even with a document whose field names start with "$".
        self._check_literal(argument, path, dollar_keys=True)
        return _leaf(_equals(argument), field)

    def _ne(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        if _is_regex(argument):
            raise QueryError('$ne cannot take a regular expression; use {"$not": <regex>}', path)
        return _negate(self._eq(op, argument, field, path))

    def _order(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        if _is_regex(argument):
            raise QueryError(f"{op} cannot take a regular expression", path)
        self._check_literal(argument, path, dollar_keys=True)
        return _leaf(_ordering(op, argument), field)

    def _in(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        if isinstance(argument, str) and argument.startswith(_PLACEHOLDER_PREFIXES):
            # `{"team": {"$in": "$claims.teams"}}`: a claim holding the values (scopes only).
            self._check_placeholder(argument, path)
            if self._placeholders is _Placeholders.ALLOW:
                return _leaf(_membership([], []), field)
        if not isinstance(argument, _ARRAYS):
            raise QueryError(f"{op} needs an array", path)
        values: list[Any] = []
        patterns: list[Predicate] = []
        for index, item in enumerate(argument):
            item_path = f"{path}[{index}]"
            if _is_regex(item):
                patterns.append(_regex_value_test(item, item_path))
            else:
                self._check_literal(item, item_path)
                values.append(item)
        return _leaf(_membership(values, patterns), field)

    def _nin(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        return _negate(self._in(op, argument, field, path))

    def _exists(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        self._check_not_placeholder(argument, op, path)
        present = _leaf(_is_present, field)
        return present if _true_value(argument) else _negate(present)

    def _size(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        size = _whole_number(argument)
        if size is None or size < 0:
            raise QueryError("$size needs a non-negative whole number", path)
        return _leaf(_has_size(size), field, expand_leaf=False)

    def _all(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        if not isinstance(argument, _ARRAYS):
            raise QueryError("$all needs an array", path)
        if not argument:
            return _never
        with_elem_match = _is_elem_match_entry(argument[0])
        return _all_of(
            [
                self._all_entry(item, with_elem_match, field, f"{path}[{index}]")
                for index, item in enumerate(argument)
            ]
        )

    def _all_entry(
        self, item: Any, with_elem_match: bool, field: str | None, path: str
    ) -> Predicate:
        if _is_elem_match_entry(item) != with_elem_match:
            message = '$all takes either only {"$elemMatch": ...} entries or only values'
            raise QueryError(message, path)
        if with_elem_match:
            elem_path = _join(path, "$elemMatch")
            return self._elem_match("$elemMatch", item["$elemMatch"], field, elem_path)
        if _is_regex(item):
            return _leaf(_regex_value_test(item, path), field)
        if _is_operator_document(item):
            raise QueryError('$all takes values (or {"$elemMatch": ...}), not operators', path)
        self._check_literal(item, path)
        return _leaf(_equals(item), field)

    def _elem_match(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        if not isinstance(argument, Mapping):
            raise QueryError("$elemMatch needs an object", path)
        if _is_elem_match_on_values(argument):
            test = _some_element(self._operators(argument, None, path))
        else:
            test = _some_subdocument(self.query(argument, path))
        return _leaf(test, field, expand_leaf=False)

    def _not(self, op: str, argument: Any, field: str | None, path: str) -> Predicate:
        if _is_regex(argument):
            return _negate(_leaf(_regex_value_test(argument, path), field))
        if not _is_operator_document(argument):
            if isinstance(argument, Mapping) and not argument:
                raise QueryError("$not cannot be empty", path)
            example = '{"$not": {"$gt": 5}}'
            message = f"$not needs an operator object or a regular expression, e.g. {example}"
            raise QueryError(message, path)
        return _negate(self._operators(argument, field, path))

    def _regex(self, spec: Mapping[str, Any], field: str | None, path: str) -> Predicate:
        regex_path = _join(path, "$regex")
        pattern = spec["$regex"]
        self._check_not_placeholder(pattern, "$regex", regex_path)
        source, letters = _regex_source(pattern, regex_path)
        if "$options" in spec:
            letters = self._options(spec["$options"], letters, _join(path, "$options"))
        return _leaf(_regex_test(source, letters, regex_path), field)

    def _options(self, options: Any, letters: str, path: str) -> str:
        self._check_not_placeholder(options, "$options", path)
        if not isinstance(options, str) or not set(options) <= _QUERY_FLAGS:
            raise QueryError("$options must be a string of the flags i, m, s and x", path)
        if letters.replace("u", ""):
            raise QueryError("flags are set both in the $regex value and in $options", path)
        return _canonical_flags(options + letters)

    def _check_literal(self, value: Any, path: str, *, dollar_keys: bool = False) -> None:
        """A value compared as data: a BSON type, and placeholders only where allowed."""
        rank = _rank(value)
        if rank == _UNKNOWN:
            raise QueryError(f"a value of type {_type_name(value)} cannot be used in a query", path)
        if isinstance(value, str):
            self._check_placeholder(value, path)
        elif isinstance(value, _ARRAYS):
            for index, item in enumerate(value):
                self._check_literal(item, f"{path}[{index}]", dollar_keys=dollar_keys)
        elif isinstance(value, Mapping):
            self._check_document(value, path, dollar_keys)

    def _check_document(self, value: Mapping[Any, Any], path: str, dollar_keys: bool) -> None:
        for key, item in value.items():
            item_path = _join(path, str(key))
            if not isinstance(key, str):
                raise QueryError(f"field names must be strings, not {_type_name(key)}", item_path)
            # Outside $eq, a "$" key in a value is nearly always a misplaced operator.
            if key.startswith("$") and not dollar_keys and key not in _DBREF_KEYS:
                message = (
                    f"{key} cannot appear inside a value: to test a subfield use a dotted path "
                    'such as {"a.b": {"$gt": 1}}; to compare with such a document use $eq'
                )
                raise QueryError(message, item_path)
            self._check_literal(item, item_path, dollar_keys=dollar_keys)

    def _check_placeholder(self, text: str, path: str) -> None:
        if self._placeholders is _Placeholders.LITERAL or not text.startswith(self._prefixes):
            return
        if self._placeholders is _Placeholders.REJECT:
            message = f"placeholder {text} is not allowed here (only a scope may use placeholders)"
            raise QueryError(message, path)
        if self._pattern.match(text) is None:
            message = f"{text} is not a placeholder: use {self._known}"
            raise QueryError(message, path)

    def _check_not_placeholder(self, value: Any, op: str, path: str) -> None:
        if (
            self._placeholders is not _Placeholders.LITERAL
            and isinstance(value, str)
            and value.startswith(self._prefixes)
        ):
            raise QueryError(f"placeholders cannot be used in {op}", path)


# ---------------------------------------------------------------------------------------------
# Placeholders
# ---------------------------------------------------------------------------------------------


class _NoValue(Exception):
    """A placeholder without a value: the query cannot match."""


_LITERAL_OPERATORS: Final = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin"})


def _is_placeholder(value: Any, pattern: re.Pattern[str] = PLACEHOLDER_PATTERN) -> bool:
    return isinstance(value, str) and pattern.match(value) is not None


def _map_query(
    query: Mapping[str, Any],
    replace: Callable[[str], Any],
    pattern: re.Pattern[str] = PLACEHOLDER_PATTERN,
) -> dict[str, Any]:
    """A copy of `query` with `replace` applied to each placeholder where a value is compared."""
    result: dict[str, Any] = {}
    for key, value in query.items():
        if key in _LOGICAL_OPERATORS and isinstance(value, _ARRAYS):
            result[key] = [
                _map_query(item, replace, pattern) if isinstance(item, Mapping) else item
                for item in value
            ]
        elif isinstance(key, str) and key.startswith("$"):
            result[key] = value
        else:
            result[key] = _map_field(value, replace, pattern)
    return result


def _map_field(value: Any, replace: Callable[[str], Any], pattern: re.Pattern[str]) -> Any:
    if _is_operator_document(value):
        return _map_operators(value, replace, pattern)
    if _is_placeholder(value, pattern):
        replaced = replace(value)
        # A document or regex standing alone would read as operators or a pattern: keep it data.
        is_data = isinstance(replaced, Mapping) or _is_regex(replaced)
        return {"$eq": replaced} if is_data else replaced
    return _map_literal(value, replace, pattern)


def _map_operators(
    spec: Mapping[str, Any], replace: Callable[[str], Any], pattern: re.Pattern[str]
) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for op, argument in spec.items():
        if op in ("$in", "$nin") and _is_placeholder(argument, pattern):
            values = replace(argument)  # a claim with one value stands for a list of one
            result[op] = list(values) if isinstance(values, _ARRAYS) else [values]
        elif op in _LITERAL_OPERATORS:
            result[op] = _map_literal(argument, replace, pattern)
        elif op == "$all" and isinstance(argument, _ARRAYS):
            result[op] = [_map_field(item, replace, pattern) for item in argument]
        elif op == "$not" and isinstance(argument, Mapping):
            result[op] = _map_operators(argument, replace, pattern)
        elif op == "$elemMatch" and isinstance(argument, Mapping):
            on_values = _is_elem_match_on_values(argument)
            mapper = _map_operators if on_values else _map_query
            result[op] = mapper(argument, replace, pattern)
        else:
            result[op] = argument
    return result


def _map_literal(value: Any, replace: Callable[[str], Any], pattern: re.Pattern[str]) -> Any:
    if isinstance(value, str):
        return replace(value) if _is_placeholder(value, pattern) else value
    if isinstance(value, _ARRAYS):
        return [_map_literal(item, replace, pattern) for item in value]
    if isinstance(value, Mapping) and not isinstance(value, DBRef):
        return {key: _map_literal(item, replace, pattern) for key, item in value.items()}
    return value


def placeholders_in(query: Mapping[str, Any], *, room: bool = False) -> set[str]:
    """The placeholders ($user.id, $user.email, $claims.<name>; with `room`, also
    $room.<param>) a query compares with."""
    found: set[str] = set()

    def record(text: str) -> str:
        found.add(text)
        return text

    _check_depth(query)
    _map_query(query, record, ROOM_PLACEHOLDER_PATTERN if room else PLACEHOLDER_PATTERN)
    return found


def substitute_placeholders(
    query: Mapping[str, Any], values: Mapping[str, Any], *, room: bool = False
) -> dict[str, Any] | None:
    """A copy of `query` with each placeholder replaced by values[placeholder].

    `values` is keyed by the placeholder itself ("$user.id", "$claims.team"). Returns None when
    a placeholder has no value (missing key or None): such a query matches nothing, which is
    how anonymous connections never match a scoped binding. A value that is a document is
    compared as data, never read as operators. With `room`, $room.<param> placeholders are
    replaced too (room join rules).
    """

    def lookup(text: str) -> Any:
        value = values.get(text)
        if value is None:
            raise _NoValue(text)
        return value

    _check_depth(query)
    try:
        return _map_query(query, lookup, ROOM_PLACEHOLDER_PATTERN if room else PLACEHOLDER_PATTERN)
    except _NoValue:
        return None


# ---------------------------------------------------------------------------------------------
# Public API
# ---------------------------------------------------------------------------------------------


class Matcher:
    """A compiled query: call it with a document to know whether the document matches."""

    __slots__ = ("_predicate", "matches_everything", "query")

    def __init__(
        self, predicate: Predicate, query: Mapping[str, Any], *, matches_everything: bool = False
    ) -> None:
        self._predicate = predicate
        self.query = query
        self.matches_everything = matches_everything

    def __call__(self, document: Mapping[str, Any]) -> bool:
        return self._predicate(document)

    def __repr__(self) -> str:
        return f"Matcher({self.query!r})"


_MATCH_EVERYTHING: Final = Matcher(_always, MappingProxyType({}), matches_everything=True)


def validate_query(
    query: object, *, allow_placeholders: bool = False, room_placeholders: bool = False
) -> None:
    """Raise QueryError if `query` is not a valid query under the operator whitelist.

    With `allow_placeholders`, string values $user.id, $user.email and $claims.<name> are
    allowed where a value is compared, and any other value starting with "$user." or
    "$claims." is an error. Without it, every such value is an error: placeholders only make
    sense in a scope. With `room_placeholders` (room join rules), $room.<param> is allowed as
    well. None, like {}, is the query that matches everything.
    """
    if query is None:
        return
    _check_depth(query)
    mode = _Placeholders.ALLOW if allow_placeholders or room_placeholders else _Placeholders.REJECT
    _Compiler(mode, room=room_placeholders).query(query, "")


def compile_query(query: Mapping[str, Any] | None) -> Matcher:
    """Validate and compile `query`; None or {} matches everything.

    Values are taken literally: substitute placeholders first (substitute_placeholders), so a
    user value that happens to start with "$user." is just data here.
    """
    if query is None or (isinstance(query, Mapping) and not query):
        return _MATCH_EVERYTHING
    _check_depth(query)
    return Matcher(_Compiler(_Placeholders.LITERAL).query(query, ""), query)


def matches(query: Mapping[str, Any] | None, document: Mapping[str, Any]) -> bool:
    """Whether `document` matches `query` (compiles each time: prefer compile_query)."""
    return compile_query(query)(document)


# Equality as an index sees it: the same keys and the same paths as the matcher.


def value_key(value: Any) -> Hashable | None:
    """A key equal for exactly the values MongoDB finds equal to `value`; None for documents,
    arrays and values without one (those compare only through the matcher)."""
    return _hash_key(value)


def path_reader(dotted: str) -> Callable[[Any], Sequence[Any]]:
    """A function giving every value a dotted path reaches in a document, as an equality on
    that path sees them: through subdocuments and arrays, a leaf array's elements and itself,
    and a missing value where a field is absent."""
    path = _FieldPath(dotted)
    parts = path.parts

    def read(document: Any) -> Sequence[Any]:
        value = document
        for part in parts:
            if type(value) is not dict:  # arrays or other mappings on the way: the general walk
                return list(path.values(document, 0, True))
            value = value.get(part, _MISSING)
        if isinstance(value, _ARRAYS):
            return [*value, value]
        return (value,)

    return read


def is_operator_document(value: Any) -> bool:
    """Whether a query value is an operator object such as {"$gt": 1}."""
    return _is_operator_document(value)


def is_regex(value: Any) -> bool:
    """Whether a query value is a regular expression (matched as a pattern, not equality)."""
    return _is_regex(value)


# -- sort order ---------------------------------------------------------------------------------


class _EmptyArray:
    """The sort value of an empty array: before null and missing, as in MongoDB."""


EMPTY_ARRAY_SORT_VALUE: Final = _EmptyArray()


def compare_values(left: Any, right: Any) -> int:
    """-1, 0 or 1: BSON comparison order across types (MongoDB's sort order)."""
    if left is EMPTY_ARRAY_SORT_VALUE or right is EMPTY_ARRAY_SORT_VALUE:
        return (right is EMPTY_ARRAY_SORT_VALUE) - (left is EMPTY_ARRAY_SORT_VALUE)
    return _compare(left, right)


def sort_value(document: Mapping[str, Any], dotted: str, descending: bool) -> Any:
    """The value MongoDB sorts a document by on `dotted`: missing is null, and an array
    sorts by its smallest element ascending, its largest descending."""
    values = [v for v in _FieldPath(dotted).values(document, 0, True) if not isinstance(v, _ARRAYS)]
    if not values:
        return EMPTY_ARRAY_SORT_VALUE
    values = [None if v is _MISSING else v for v in values]
    best = values[0]
    for value in values[1:]:
        order = _compare(value, best)
        if (order > 0) if descending else (order < 0):
            best = value
    return best


def conjunction(queries: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """One query that matches what all of `queries` match.

    Their fields stand side by side where no two name the same one, so the database can use
    its indexes (some servers plan a top-level `$and` as a scan); the others join `$and`.
    """
    merged: dict[str, Any] = {}
    rest: list[Mapping[str, Any]] = []
    for query in queries:
        if not query:
            continue
        if any(key in merged for key in query):
            rest.append(query)
        else:
            merged.update(query)
    if rest:
        merged["$and"] = [*merged.get("$and", ()), *rest]
    return merged
