"""Training (and sampling) on Tinker: `sdk.py` holds every SDK call, `trainer.py` the SDPO step in Tinker's
terms, `standin.py` a local stand-in for Tinker's service used by tests."""
