import sys

from localsgd.cli import main

sys.exit(main())
