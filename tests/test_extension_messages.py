"""The extensions' error messages never format a number through a C++ stream.

On the GPU machines the toolchain links its own copy of the C++ library into the extensions, and
a number streamed by `TORCH_CHECK`'s message (c10::str) reaches that copy's number formatting
with the process's stream: the process dies with a segmentation fault where the caller should
get a RuntimeError (the crash was traced with cuda-gdb; docs/fp8.md). Text streams safely, so
numbers go through `std::to_string` first. This test reads every C++ source of the extensions
and lists the message arguments that are not known to be text.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted(p for p in (ROOT / "cpp_ext").rglob("*") if p.suffix in {".cu", ".cuh", ".cpp", ".h"})
CHECK = re.compile(r"\bTORCH_CHECK(?:_[A-Z]+)?\s*\(")
LITERALS = re.compile(r'^(?:"(?:[^"\\]|\\.)*"\s*)+$')
TEXT_CALLS = ("std::to_string(", "c10::toString(")
TEXT_NAMES = {"op", "name"}  # the entry points' `const char*` names of themselves and of their operands
TEXT_FIELDS = (".name", ".scalar_type()")  # a CUTLASS configuration's `const char*` name; a dtype streams its name
LITERAL_CHOICE = re.compile(r'^[^?]+\?\s*"(?:[^"\\]|\\.)*"\s*:\s*"(?:[^"\\]|\\.)*"$')


def _arguments(text: str, start: int) -> list[str]:
    """The top-level arguments of the call whose '(' is at text[start - 1]."""
    args, depth, current, i = [], 0, [], start
    while i < len(text):
        c = text[i]
        if c in "\"'":  # a string or character literal, escapes kept
            j = i + 1
            while text[j] != c:
                j += 2 if text[j] == "\\" else 1
            current.append(text[i:j + 1])
            i = j + 1
            continue
        if c == "(":
            depth += 1
        elif c == ")":
            if depth == 0:
                args.append("".join(current).strip())
                return args
            depth -= 1
        elif c == "," and depth == 0:
            args.append("".join(current).strip())
            current = []
            i += 1
            continue
        current.append(c)
        i += 1
    raise ValueError("unbalanced TORCH_CHECK call")


def is_text(argument: str) -> bool:
    """Whether a message argument streams as text (never through the stream's number formatting)."""
    argument = " ".join(argument.split())
    if LITERALS.match(argument) or argument in TEXT_NAMES or LITERAL_CHOICE.match(argument):
        return True
    if argument.endswith(TEXT_FIELDS):
        return True
    return argument.startswith(TEXT_CALLS) and argument.endswith(")")


def streamed_numbers(text: str) -> list[tuple[int, str]]:
    """(line, argument) of every TORCH_CHECK message argument in `text` that is not known to be text."""
    found = []
    for match in CHECK.finditer(text):
        message = _arguments(text, match.end())[1:]
        line = text.count("\n", 0, match.start()) + 1
        found += [(line, a) for a in message if not is_text(a)]
    return found


def test_the_classifier_tells_numbers_from_text():
    sample = '''
    TORCH_CHECK(c % 64 == 0, op, ": channels must be a multiple of 64, got ", c);
    TORCH_CHECK(ok, op, ": ", std::to_string(c), " channels (", name, ")", flag ? " yes" : "");
    TORCH_CHECK(a == b, "sizes ", a.size(0), " and ",
                b.size(0));
    TORCH_CHECK(false, "dtype ", x.scalar_type(), ", 'quoted, with a comma'");
    '''
    assert [a for _, a in streamed_numbers(sample)] == ["c", "a.size(0)", "b.size(0)"]
    assert [line for line, _ in streamed_numbers(sample)] == [2, 4, 4]


def test_the_sources_are_read():
    checks = sum(len(CHECK.findall(p.read_text())) for p in SOURCES)
    assert any(p.suffix == ".cu" for p in SOURCES) and checks >= 50, (len(SOURCES), checks)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_message_streams_a_number(path: Path):
    found = streamed_numbers(path.read_text())
    assert not found, (f"{path.relative_to(ROOT)}: format these with std::to_string (a streamed number crashes "
                       f"the extension on the GPU machines): {found}")
