"""`python -m app` is the `cifar10-cnn` command: `python -m app serve`, `python -m app predict IMAGE...`."""

import sys

from app.cli import main

sys.exit(main())
