"""``python -m medfuse ...``: the ``medfuse`` command, for launchers that start a module
(``torchrun --nproc_per_node N -m medfuse train CONFIG``; docs/scaling.md)."""

from medfuse.cli import main

if __name__ == "__main__":
    main()
