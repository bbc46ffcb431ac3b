"""One module per survey file format behind one small interface (:mod:`.base`), asked through :mod:`.registry`."""
