"""Argparse value types the command-line flags share: each turns a bad value into the one-line error
argparse prints ("argument --flag: ... is not ...")."""

from __future__ import annotations

import argparse


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def float_where(holds, wanted: str):
    """An argparse type: a float for which ``holds(value)``, else an error saying it must be ``wanted``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = float("nan")
        if not holds(value):  # NaN never holds
            raise argparse.ArgumentTypeError(f"{text} is not {wanted}")
        return value

    return parse


def port_number(text: str) -> int:
    """A TCP port, 0 to 65535 (0: the system picks a free one)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"{text} is not a port number (0 to 65535)")
    return value
