"""``python -m metaembed.kernels [--arch sm_90] [--out DIR] [--force]``: compile the MaxSim kernel (see ``build.main``)."""
from .build import main

raise SystemExit(main())
