import sys

from longreach.cli import main

sys.exit(main())
