"""DefMamba / DAMamba research framework: models, ops, data, config and training engine."""
