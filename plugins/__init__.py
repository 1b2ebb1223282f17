"""nbmerge's built-in merge methods, one module each, registered through the ``nbmerge`` entry-point group."""
