"""`python -m lorapool.cli`."""

from . import main

main()
