"""``python -m mantis_llm`` runs the ``mantis-llm`` command line."""

import sys

from .cli import main

sys.exit(main())
