"""Argument types for every command's parser: bad values fail at parse time, naming the flag
(argparse adds "argument --steps:"), with exit code 2 and no traceback.

    parser.add_argument("--steps", type=positive_int, default=30)
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


class DefaultsHelp(argparse.ArgumentDefaultsHelpFormatter):
    """--help lists every default, except None ones (their help text says what they mean)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        return action.help if action.default is None else super()._get_help_string(action)


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def resolution(text: str) -> int:
    """Image side in pixels: a multiple of 8 because the VAE downsamples by 8."""
    value = _int(text)
    if value < 8 or value % 8:
        raise argparse.ArgumentTypeError(
            f"must be a positive multiple of 8 (the VAE downsamples by 8), got {value}"
        )
    return value


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def non_negative_float(text: str) -> float:
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def positive_float(text: str) -> float:
    value = finite_float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value}")
    return value


def existing_file(text: str) -> str:
    if not Path(text).is_file():
        raise argparse.ArgumentTypeError(f"no such file {text!r}: check the path")
    return text


def existing_path(text: str) -> str:
    if not Path(text).exists():
        raise argparse.ArgumentTypeError(f"no such file or folder {text!r}: check the path")
    return text


def existing_dir(text: str) -> str:
    if not Path(text).is_dir():
        raise argparse.ArgumentTypeError(f"no such folder {text!r}: check the path")
    return text


def output_dir(text: str) -> str:
    """A folder to write into: may exist (resume, overwrite) but must not be a file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(
            f"{text!r} is an existing file, not a folder: pass a folder name"
        )
    if any(p.exists() and not p.is_dir() for p in path.parents):
        raise argparse.ArgumentTypeError(f"{text!r} lies under a file: pass a folder name")
    return text


def output_file(text: str) -> str:
    """A file to write: must not be an existing folder, and its parent must not be a file."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text!r} is a folder: pass a file name")
    if any(p.exists() and not p.is_dir() for p in path.parents):
        raise argparse.ArgumentTypeError(f"{text!r} lies under a file: pass another path")
    return text
