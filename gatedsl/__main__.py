import sys

from gatedsl.cli.main import main

sys.exit(main())
