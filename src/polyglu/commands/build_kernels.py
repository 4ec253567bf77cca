"""polyglu build-kernels [--path] [--force]: compile the native CPU kernels now (else built on first use)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--path", action="store_true",
                   help="print where the library for this torch and CPU is (or would be) cached; build nothing")
    p.add_argument("--force", action="store_true", help="compile again even if the library is cached")


def run(args: argparse.Namespace) -> int:
    from polyglu.commands import CommandError
    from polyglu.model import native

    if args.path:
        print(native.library_path())
        return 0
    try:
        path = native.build(force=args.force)
        native.load(path)
    except OSError as e:  # NativeBuildError included
        raise CommandError(str(e)) from None
    print(path)
    return 0
