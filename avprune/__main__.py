import sys

from avprune.cli import main

sys.exit(main())
