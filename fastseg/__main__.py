"""``python -m fastseg`` = the ``fastseg`` command."""
from fastseg.cli import main

raise SystemExit(main())
