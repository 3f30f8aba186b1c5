import sys

from localsgd.harness.cli import main

sys.exit(main())
