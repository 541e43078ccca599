"""`peftc export`: not part of this build yet (see the README's roadmap)."""

from __future__ import annotations

import argparse
import sys


def add_parser(sub) -> None:
    sub.add_parser("export", help="(coming) export")


def run(args: argparse.Namespace) -> int:
    print("peftc export is not available in this build", file=sys.stderr)
    return 2
