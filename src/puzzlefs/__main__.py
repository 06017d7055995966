import sys

from puzzlefs.cli import main

sys.exit(main())
