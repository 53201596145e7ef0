"""`python -m agent`: see agent.cli."""
from . import early_signals

early_signals.hold()  # before the heavy imports: a SIGTERM during start-up is acted on, not fatal

from .cli import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
