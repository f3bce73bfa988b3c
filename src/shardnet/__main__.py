"""python -m shardnet: the same as the shardnet command."""

import sys

from shardnet.cli import main

sys.exit(main())
