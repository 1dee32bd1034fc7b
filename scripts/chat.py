#!/usr/bin/env python
"""Talk to a DeepSeek-VL2 checkpoint: the `vl2-chat` console command (deepseek_vl2_lora/evaluation/chat.py has the
modes and options; `--help`)."""

import sys

from deepseek_vl2_lora.cli import chat

if __name__ == "__main__":
    sys.exit(chat())
