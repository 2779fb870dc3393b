import sys

from ling.cli import main

sys.exit(main())
