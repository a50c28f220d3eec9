"""Equipment mapping files (YAML), one per equipment model."""
