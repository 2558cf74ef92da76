import sys

from inferoxy.cli import main

sys.exit(main())
