import sys

from knotd.cli import main

sys.exit(main())
