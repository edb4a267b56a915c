import sys

from eep.cli import main

sys.exit(main())
