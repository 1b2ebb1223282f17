"""Everything that imports IPython or ipywidgets: the magics, the panels, their controls and the progress bar.

Nothing outside this package imports it (the package face registers the magics lazily by ``MAGIC_NAMES``), so
the core runs where no notebook stack is installed. This file itself imports nothing heavy.
"""

MAGIC_NAMES = ("merge", "merge_eval", "merge_sweep", "merge_search", "merge_methods")


def load_ipython_extension(ipython) -> None:
    """``%load_ext nbmerge``: register the magics."""
    from nbmerge.notebook.magics import MergeMagics

    ipython.register_magics(MergeMagics)
