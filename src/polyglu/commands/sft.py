"""polyglu sft --config FILE [key=value ...] [--resume | --overwrite]: supervised fine-tuning (loss on assistant tokens)."""

from __future__ import annotations

import argparse

from polyglu.commands.train import add_arguments  # noqa: F401  (same options)
from polyglu.commands.train import run as _run


def run(args: argparse.Namespace) -> int:
    return _run(args, task="sft")
