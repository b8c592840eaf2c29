"""What the sanitizer.pth line calls at interpreter start when SANITIZE_THREADS is set."""

from __future__ import annotations

import os
import sys

_started = False


def start() -> None:
    """Enable from the environment. Never raises: a bad setting is one line on stderr."""
    global _started
    # site.py can process one site-packages twice (a venv's lib64 -> lib symlink).
    if _started:
        return
    _started = True
    from sanitizer.options import ENV_VAR, HelpRequested, help_text, parse

    try:
        options = parse(os.environ.get(ENV_VAR))
        if options is None:
            return
        from sanitizer import control

        control.enable(options)
    except HelpRequested:
        sys.stdout.write(help_text() + "\n")
        sys.stdout.flush()
        os._exit(0)  # SystemExit would be swallowed by site.py's .pth handling
    except Exception as exc:
        sys.stderr.write(f"sanitizer: {exc}; running without the sanitizer\n")
