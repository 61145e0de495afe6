"""Training (and sampling) on Tinker: `sdk.py` holds every SDK call, `trainer.py` the SDPO step in Tinker's
terms, `store.py` adapter versions as Tinker checkpoint paths. The tests' stand-in for Tinker's service is
`tests/tinker_standin.py`."""
