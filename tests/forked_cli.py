"""Run many short `bnrepro` commands as real processes without paying the torch/torchvision import each time.

Usage: ``python forked_cli.py < commands.json`` with ``{"name": ["mnist", "--steps", "5", ...], ...}``; prints
``{"name": {"returncode": int, "stdout": str, "stderr": str}, ...}``.

This process imports the package once (and computes nothing, so forking is safe), then forks one child per
command. Each child gets stdin from /dev/null and its own stdout/stderr files, and does what the `bnrepro`
console script (``bnrepro.cli.run``) does: ``main()``, then ``os._exit`` with the exit status from SystemExit,
and 1 with a traceback on stderr for any other exception. The parent records the child's exit status.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import traceback


def _child(args: list[str], stdout: int, stderr: int) -> None:
    status = 1
    try:
        devnull = os.open(os.devnull, os.O_RDONLY)
        os.dup2(devnull, 0)
        os.dup2(stdout, 1)
        os.dup2(stderr, 2)
        sys.argv = ["bnrepro", *args]
        from bnrepro.cli import main

        sys.exit(main())
    except SystemExit as stop:
        if stop.code is None or isinstance(stop.code, int):
            status = stop.code or 0
        else:
            print(stop.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def main() -> None:
    commands: dict[str, list[str]] = json.load(sys.stdin)
    import bnrepro.cli  # noqa: F401  (the imports every command would otherwise repeat)
    import bnrepro.data.mnist  # noqa: F401
    import bnrepro.experiments.imagenet  # noqa: F401
    import bnrepro.experiments.mnist  # noqa: F401
    import bnrepro.report.imagenet  # noqa: F401
    import bnrepro.report.mnist  # noqa: F401

    results = {}
    for name, args in commands.items():
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            sys.stdout.flush()
            sys.stderr.flush()
            pid = os.fork()
            if pid == 0:
                _child(args, out.fileno(), err.fileno())
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            err.seek(0)
            results[name] = {"returncode": os.waitstatus_to_exitcode(status),
                             "stdout": out.read().decode(errors="replace"),
                             "stderr": err.read().decode(errors="replace")}
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
