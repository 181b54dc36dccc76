import sys

from depmatch.cli import main

sys.exit(main())
