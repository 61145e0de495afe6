"""The Ray layer: Serve deployments and the app builder that serve YAMLs name in `import_path`."""
