"""``python -m deepseek_vl2_lora.data check FILE...`` (see `check`)."""

import sys

from .check import main

sys.exit(main())
