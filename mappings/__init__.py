"""Equipment mapping files (YAML), one per equipment model; ``gateway.mappings`` reads them."""
