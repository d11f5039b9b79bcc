"""`python -m sedd_scale.config RECIPE --world-size N [--gpu G] [--propose]`: see `sedd_scale.config.cli`."""
import sys

from sedd_scale.config.cli import main

sys.exit(main())
