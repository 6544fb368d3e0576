"""What every Tandem service shares: bootstrap, error table, tensor codec, logging, settings, model repository."""
