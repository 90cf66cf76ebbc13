import sys

from megatron_dualpipe.cli import main

sys.exit(main())
