import sys

from puzzlefs._entry import main

sys.exit(main())
