"""Methods that merge each matrix's task vectors through their singular value decompositions: TSV-M (task
singular vectors) and isotropic merging (Iso-C, Iso-CTS). ``_singular`` holds the SVD steps they share."""
