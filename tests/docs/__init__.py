"""Documentation tests: the MkDocs site builds strictly; every public opd_ref object is documented."""
