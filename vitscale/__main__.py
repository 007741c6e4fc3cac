import sys

from vitscale.cli import main

sys.exit(main())
