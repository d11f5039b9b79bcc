"""`python -m sedd_scale.train RECIPE [--set k=v ...]`: see `sedd_scale.train.main`."""
import sys

from sedd_scale.train.main import main

sys.exit(main())
