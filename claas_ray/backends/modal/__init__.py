"""SDPO steps on Modal GPUs: `app.py` is the deployed app, `client.py` the trainer deployment's side."""
