"""CLI commands run in-process by tests, and what they gave back."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


def runner(parser: argparse.ArgumentParser, capsys: Any) -> Callable[..., Run]:
    """Runs `crosslogic ARGV...` through `parser` (its handlers) and captures the output."""

    def run(*argv: str) -> Run:
        args = parser.parse_args(argv)
        code = args.handler(args)
        captured = capsys.readouterr()
        return Run(code, captured.out, captured.err)

    return run
