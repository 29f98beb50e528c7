"""mdb-engine compatible routing names."""
