"""``python -m refbnn.golden``: write or check golden vectors (the flags: :mod:`refbnn.golden.cli`)."""

from refbnn import cli_util
from refbnn.golden.cli import main

if __name__ == "__main__":
    cli_util.run_main(main)
