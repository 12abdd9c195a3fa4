"""``python -m qlora_guide`` is the same as the ``qlora-guide`` command."""

import sys

from qlora_guide.cli import main

sys.exit(main())
