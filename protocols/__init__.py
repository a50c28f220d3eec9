"""Wire protocols and device families; the only code that imports their libraries."""
