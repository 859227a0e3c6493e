"""One minimum Python version everywhere: setup.py, install.sh and the README agree.

The machines run Debian 12, whose python3 is 3.11; a second number anywhere
sends an administrator looking for a Python Willi does not need, or lets
pip install Willi where it cannot run.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The phrase the README uses wherever it states the minimum.
STATED = re.compile(r"Python (3\.\d+) or newer")


def python_requires(setup_source: str) -> str:
    """The version in setup()'s python_requires=">=X.Y"."""
    for node in ast.walk(ast.parse(setup_source)):
        if isinstance(node, ast.keyword) and node.arg == "python_requires":
            value = ast.literal_eval(node.value)
            match = re.fullmatch(r">=\s*(\d+\.\d+)", value)
            assert match, f"python_requires should be '>=X.Y', not {value!r}"
            return match.group(1)
    raise AssertionError("setup.py has no python_requires")


def stated_minimums(text: str) -> set[str]:
    """Every X.Y in 'Python X.Y or newer' sentences (line breaks count as spaces)."""
    return set(STATED.findall(" ".join(text.split())))


def install_sh_minimum(source: str) -> str:
    """install.sh's PYTHON_MIN=X.Y, the version its probe enforces."""
    match = re.search(r"^PYTHON_MIN=(\d+\.\d+)$", source, re.MULTILINE)
    assert match, "install.sh has no PYTHON_MIN=X.Y line"
    return match.group(1)


def as_tuple(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


@pytest.mark.parametrize(("source", "expected"), [
    ('setup(name="w", python_requires=">=3.11")', "3.11"),
    ('setup(python_requires=">= 3.12", version="1")', "3.12"),
])
def test_python_requires_is_read_from_setup(source: str, expected: str) -> None:
    assert python_requires(source) == expected


@pytest.mark.parametrize("source", ['setup(python_requires="~=3.11")', 'setup(name="w")'])
def test_python_requires_in_another_form_is_an_error(source: str) -> None:
    with pytest.raises(AssertionError):
        python_requires(source)


@pytest.mark.parametrize(("text", "expected"), [
    ("Willi needs Python 3.11 or newer.", {"3.11"}),
    ("needs Python 3.9 or newer ... (Python\n3.10 or newer)", {"3.9", "3.10"}),
    ("# Needs Python 3.11 or newer with venv", {"3.11"}),
    ("Python 3 or newer; python 3.11 or newer", set()),
])
def test_stated_minimums(text: str, expected: set[str]) -> None:
    assert stated_minimums(text) == expected


def test_setup_and_install_sh_state_one_minimum_that_this_python_meets() -> None:
    required = python_requires((ROOT / "setup.py").read_text())
    install_sh = (ROOT / "install.sh").read_text()
    header = install_sh.split("\nset -eu\n", 1)[0]
    assert install_sh_minimum(install_sh) == required
    assert stated_minimums(header) == {required}, "install.sh's header comment names another version"
    assert sys.version_info >= as_tuple(required), f"this Python is older than {required}"


def test_the_readme_states_the_same_minimum() -> None:
    required = python_requires((ROOT / "setup.py").read_text())
    stated = stated_minimums((ROOT / "README.md").read_text())
    assert stated == {required}, f"README.md says Python {sorted(stated)} or newer; setup.py says {required}"
