"""``python -m sandboxd.runtime.network``: the network helper process (see :mod:`.helper`)."""

from .helper import main

main()
