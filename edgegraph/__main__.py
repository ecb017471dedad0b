"""`python -m edgegraph` runs the command-line tool."""

from edgegraph.cli import main

raise SystemExit(main())
