"""`python -m lit_opd ...` is `lit-opd ...`."""

from lit_opd.cli import main

main()
