"""Zero-downtime migration of the index to another model: a pure core and its adapters."""
