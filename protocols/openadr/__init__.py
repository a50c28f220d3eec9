"""openadr."""
