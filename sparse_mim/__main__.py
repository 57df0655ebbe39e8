"""``python -m sparse_mim ...`` is the ``sparse-mim`` command (also under ``torchrun -m sparse_mim``)."""
import sys

from .cli import main

sys.exit(main())
