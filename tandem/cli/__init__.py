"""The `tandem` command line: `serve` and its supervisor, `models` (repository tools), `bench`, dev certificates."""
