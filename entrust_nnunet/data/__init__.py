"""Data: image IO with the safety rules every writer follows, phantoms with known conflict, dataset conversion."""
