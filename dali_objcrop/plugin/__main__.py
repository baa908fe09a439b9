"""``python -m dali_objcrop.plugin [--cpu|--cuda] [-v]``: build the operators now and print the library path."""
from .build import main

raise SystemExit(main())
