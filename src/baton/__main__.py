"""``python -m baton``: the command line."""

from baton.cli import main

if __name__ == "__main__":
    main()
