"""The ``qiao`` command-line interface (thin: parse, call the library, print)."""
