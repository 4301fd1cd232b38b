"""Reading a TOML file a user gave (scenario files, ``serve --host``): one-line errors only.

A missing or unreadable file, bytes that are not UTF-8, a syntax error and a document nested
too deeply for the parser all become :class:`TomlFileError` with one line naming the file.
"""

from __future__ import annotations

import tomllib
from typing import Any


class TomlFileError(ValueError):
    """The file cannot be read as TOML; the message is one line for the user."""


def read_toml(path: str, *, what: str = "file") -> dict[str, Any]:
    """The parsed document at ``path`` (``what`` names the file in the read error)."""
    try:
        with open(path, "rb") as fh:
            return tomllib.load(fh)
    except OSError as exc:
        raise TomlFileError(f"cannot read {what} {path!r}: {exc.strerror or exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise TomlFileError(f"{path}: not valid TOML: {exc}") from None
    except RecursionError:
        raise TomlFileError(f"{path}: not valid TOML: nested too deeply") from None
