"""One thin module per DVC stage: params -> inputs -> `pipeline` -> outputs."""
