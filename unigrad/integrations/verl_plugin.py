"""The `verl.plugins` entry point: verl imports this at `import verl`, which registers unigrad's policy losses."""

from unigrad.integrations.verl import register

REGISTERED = register()  # the loss names, for a look at what was registered
