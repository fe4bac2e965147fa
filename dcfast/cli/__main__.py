"""`python -m dcfast.cli ...` = `dcfast ...`."""
import sys

from dcfast.cli.main import main

sys.exit(main())
