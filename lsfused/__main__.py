import sys

from lsfused.cli import main

sys.exit(main())
