import sys

from rankbias.cli import main

sys.exit(main())
