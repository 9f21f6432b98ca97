"""`python -m egressguard` is the same as the `egressguard` command."""

from egressguard.cli import main

raise SystemExit(main())
