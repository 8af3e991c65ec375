"""Entry point: ``python -m pvbess.size [site=...] site.bess.capacity_kwh=0,1700,3400 ...``.

What each design of the site emits and costs per year; the sizing itself is
``pvbess.experiment.sizing``.
"""

from __future__ import annotations

import sys

from pvbess.experiment.sizing import main

if __name__ == "__main__":
    sys.exit(main())
