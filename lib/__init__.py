"""em-lab's helper package; the notebooks call into it. Its modules form four layers and
import only downwards (tests/test_architecture.py checks; README.md lists every module).

Heavy third-party packages (torch, transformers, peft, trl, tokenizers, altair, openai) are
imported inside the functions that use them, on purpose: importing them takes seconds, and
parameter checks, the grid runner and the report start without them. Imports of lib's own
modules are always at the top of a file.
"""

from . import quiet as _quiet

_quiet.install()  # known-harmless third-party warnings, filtered by message (lib/quiet.py)
