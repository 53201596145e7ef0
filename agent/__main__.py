"""`python -m agent`: see agent.cli."""
from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
